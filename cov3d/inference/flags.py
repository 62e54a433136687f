"""The flags of a prediction that cannot be trusted (docs/inference.md#flags): the scan's own
(``not-ct``, ``no-lungs``: ``cov3d.dataset.domain``, measured while it was read) and the models'
(``synthetic-model``: a member trained on ``cov3d synthetic`` data; ``out-of-distribution``: the
scan's grey levels lie far from a member's training scans, ``cov3d.model.grey_reference``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from cov3d.dataset.domain import FLAG_OUT_OF_DISTRIBUTION, FLAG_SYNTHETIC_MODEL, FLAGS, scan_flags
from cov3d.model.files import ModelSource
from cov3d.model.grey_reference import grey_histogram
from cov3d.settings import VolumeShape


class DomainChecks:
    """The checks of one ensemble: ``members`` are (model, the shape of its input volumes)."""

    def __init__(self, members: Sequence[tuple[ModelSource, VolumeShape]]):
        synthetic = sorted({str(source.path) for source, _ in members if source.synthetic})
        self.model_flags = (
            {FLAG_SYNTHETIC_MODEL: f"trained on synthetic data (cov3d synthetic): {', '.join(synthetic)}"} if synthetic else {}
        )
        self.references = [(source, shape) for source, shape in members if source.grey_reference is not None]

    def flags(self, domain: dict | None, volumes: dict[VolumeShape, torch.Tensor] | None = None) -> dict[str, str]:
        """``{flag: reason}`` of one scan from its domain measures and its stored uint8 levels
        ``{shape: (1, D, H, W)}`` (the input of each member; without them no ``out-of-distribution``)."""
        flags = {**scan_flags(domain), **self.model_flags}
        for source, shape in self.references:
            if volumes is None or shape not in volumes:
                continue
            reference = source.grey_reference
            distance = reference.distance(grey_histogram(volumes[shape]))
            if distance > reference.threshold:
                flags[FLAG_OUT_OF_DISTRIBUTION] = (
                    f"its grey levels lie {distance:.1f} from the training scans of {Path(source.path).name} "
                    f"(the furthest of them, with margin: {reference.threshold:.1f})"
                )
        return flags


def flag_counts(flagged: Iterable[dict[str, str]]) -> str:
    """'not-ct 1, no-lungs 2': how many scans carry each flag, in ``FLAGS`` order."""
    counts = Counter(code for flags in flagged for code in flags)
    return ", ".join(f"{code} {counts[code]}" for code in FLAGS if counts[code])


def flags_title(flags: dict[str, str]) -> str:
    """The flags as a figure title line: 'FLAGGED: not-ct, synthetic-model' (empty when none)."""
    return "FLAGGED: " + ", ".join(code for code in FLAGS if code in flags) if flags else ""
