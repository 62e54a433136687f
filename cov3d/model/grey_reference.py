"""What a model's training scans look like, for the ``out-of-distribution`` flag: the grey-level
histogram of the preprocessed volumes (what the network sees), recorded in config.json when the
model is trained (``GreyReference.fit``) and compared with each scan at inference (``distance``).

A scan's histogram ``h`` (``HISTOGRAM_BINS`` bins of the 256 stored levels, shares summing to 1)
is compared with the training scans' mean ``m`` and standard deviation ``s`` per bin: its distance is
the root mean square of ``(h - m) / (s + STD_FLOOR)`` over the bins, a z-score per bin. The
threshold is the largest distance of a training scan times ``THRESHOLD_MARGIN``: a scan further
from the training scans than any of them was, by that margin, is flagged. tests/model/test_grey_reference.py
shows on held-apart synthetic scans that this keeps them and flags shifted ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

HISTOGRAM_BINS = 16
"""Bins of 16 grey levels each: coarse enough to ignore noise, fine enough to tell lung, fat and
soft tissue apart (about 90 HU a bin through the default window)."""
LEVELS = 256
STD_FLOOR = 0.01
"""Added to each bin's standard deviation: a bin that never varied in training (one share point)
does not make every small difference infinitely far."""
THRESHOLD_MARGIN = 1.5
"""The threshold over the furthest training scan (half again: the furthest of n scans is itself a
chance value)."""


def grey_histogram(levels: torch.Tensor) -> np.ndarray:
    """Shares (HISTOGRAM_BINS,) float64 of the stored uint8 levels of one volume (any shape)."""
    counts = torch.bincount(levels.reshape(-1).to(torch.int64) // (LEVELS // HISTOGRAM_BINS), minlength=HISTOGRAM_BINS)
    return counts.double().numpy() / max(1, levels.numel())


@dataclass(frozen=True)
class GreyReference:
    """The training scans' mean and standard deviation per bin (HISTOGRAM_BINS,), the threshold
    of ``distance`` and how many scans they came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float
    scans: int

    @classmethod
    def fit(cls, histograms: Iterable[np.ndarray]) -> GreyReference:
        """The reference of training scans' ``grey_histogram``s (at least one)."""
        stacked = np.stack(list(histograms))
        mean, std = stacked.mean(axis=0), stacked.std(axis=0)
        distances = _distances(stacked, mean, std)
        return cls(tuple(map(float, mean)), tuple(map(float, std)), float(distances.max() * THRESHOLD_MARGIN),
                   len(stacked))

    def distance(self, histogram: np.ndarray) -> float:
        """How far one scan's ``grey_histogram`` lies from the training scans (see the module docstring)."""
        return float(_distances(histogram[None], np.asarray(self.mean), np.asarray(self.std))[0])

    def to_config(self) -> dict:
        """The JSON-able record for config.json (``from_config`` reads it back)."""
        return {"bins": HISTOGRAM_BINS, "mean": list(self.mean), "std": list(self.std), "threshold": self.threshold,
                "scans": self.scans}

    @classmethod
    def from_config(cls, record: object) -> GreyReference | None:
        """The reference recorded in a config, or ``None`` if there is none (older models) or it
        has another number of bins or is malformed."""
        if not isinstance(record, dict) or record.get("bins") != HISTOGRAM_BINS:
            return None
        try:
            mean, std = tuple(map(float, record["mean"])), tuple(map(float, record["std"]))
            threshold, scans = float(record["threshold"]), int(record["scans"])
        except (KeyError, TypeError, ValueError):
            return None
        if len(mean) != HISTOGRAM_BINS or len(std) != HISTOGRAM_BINS or not np.isfinite([*mean, *std, threshold]).all():
            return None
        return cls(mean, std, threshold, scans)


def _distances(histograms: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Root-mean-square z-score over the bins of each row of ``histograms`` (n, bins) -> (n,)."""
    return np.sqrt(np.mean(((histograms - mean) / (std + STD_FLOOR)) ** 2, axis=1))
