"""The calibration of the default HU window to COV19-CT-DB's grey levels, and the grey-band measure
it was fitted with.

COV19-CT-DB ships 8-bit JPEG slices; DICOM, NIfTI and the synthetic phantoms hold HU. A model trained
on COV19-CT-DB works on them only if they reach it with COV19-CT-DB's grey levels, so they go through
``COV19_CT_DB_WINDOW`` (``cov3d.window``), the window whose band fractions (``band_fractions`` over
``BAND_EDGES``) on a real CT series are nearest to COV19-CT-DB's (``COV19_CT_DB_BANDS``).
docs/intensities.md gives the measurements and the fit; ``scripts/intensity_bands.py --fit`` repeats
it. ``LEGACY_LUNG_WINDOW``, cov3d's former window, is kept for comparisons.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cov3d.window import MAX_GREY, Window

__all__ = [
    "BAND_EDGES",
    "COV19_CT_DB_BANDS",
    "HEALTHY_LUNG_HU",
    "LEGACY_LUNG_WINDOW",
    "band_distance",
    "band_fractions",
    "middle_half",
]

LEGACY_LUNG_WINDOW = Window(level=-600.0, width=1500.0)
"""cov3d's mapping before the calibration (air ~60, soft tissue ~236): for comparisons only."""
HEALTHY_LUNG_HU = -850.0
"""Typical aerated lung parenchyma (e.g. Radiopaedia, "Hounsfield unit"): the phantoms' lungs and
the grey ``cov3d explain --method occlusion`` puts in place of each block."""

BAND_EDGES = (40, 100, 160, 220)
"""Grey-level band edges: bands < 40, 40-99, 100-159, 160-219, >= 220."""
COV19_CT_DB_BANDS = (0.32, 0.26, 0.07, 0.24, 0.11)
"""Fractions of COV19-CT-DB pixels in those bands (measured on real slices of the dataset)."""
COV19_CT_DB_AIR_GREY, COV19_CT_DB_SOFT_TISSUE_GREY = 30, 195
"""Grey levels of air outside the body (25-35) and of the soft-tissue peak (189-200) in COV19-CT-DB."""


def band_fractions(grey: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """Fractions (5,) of the pixels of 8-bit images (one array, or an iterable of slices) in the bands."""
    arrays = [grey] if isinstance(grey, np.ndarray) else list(grey)
    counts = np.zeros(MAX_GREY + 1, dtype=np.int64)
    for array in arrays:
        counts += np.bincount(np.asarray(array, dtype=np.uint8).ravel(), minlength=MAX_GREY + 1)
    total = counts.sum()
    if total == 0:
        raise ValueError("no pixels to measure")
    edges = (0, *BAND_EDGES, MAX_GREY + 1)
    return np.array([counts[a:b].sum() for a, b in zip(edges[:-1], edges[1:])]) / total


def band_distance(fractions: Iterable[float], reference: Iterable[float] = COV19_CT_DB_BANDS) -> float:
    """L1 distance between two band-fraction vectors (0: same; at most 2)."""
    return float(np.abs(np.asarray(list(fractions), dtype=np.float64) - np.asarray(list(reference))).sum())


def middle_half(count: int) -> range:
    """Indices of the middle half of ``count`` slices (from 1/4 to 3/4 of the depth; all of 1-3)."""
    start = count // 4
    return range(start, max(count - start, start + 1))
