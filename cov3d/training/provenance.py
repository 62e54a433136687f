"""What a run used, for config.json: library versions, a fingerprint of the labelled dataset, where
the data came from (``training_data``) and the grey levels of its training scans (``grey_reference``,
for the ``out-of-distribution`` flag)."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from cov3d import __version__
from cov3d.dataset.layout import SYNTHETIC_MARKER
from cov3d.dataset.scans import list_slices
from cov3d.model.grey_reference import GreyReference, grey_histogram
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.training.data import TrainingItem

VERSIONED_PACKAGES = ("torchvision", "fastai", "fastcore", "numpy", "scikit-learn", "wandb")


def versions() -> dict[str, str | None]:
    """Versions of Python, cov3d, torch (and its CUDA) and the other libraries that shape a run."""
    found: dict[str, str | None] = {
        "python": platform.python_version(), "cov3d": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
    }
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def dataset_fingerprint(items: Sequence[TrainingItem]) -> str:
    """SHA-256 over the sorted lines 'partition/name;has_covid;severity;slice count' of the labelled scans.

    Changes when a scan is added, removed, relabelled or gains or loses slices; not when files are touched.
    """
    lines = sorted(
        f"{item.partition}/{item.name};{item.has_covid};{item.severity};{len(list_slices(item.path))}" for item in items
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def training_data(data_dir: Path) -> dict:
    """Where the training data came from: ``{"synthetic": True, "generator": ...}`` for a dataset of
    ``cov3d synthetic`` (its ``SYNTHETIC_MARKER``), else ``{"synthetic": False}``."""
    marker = Path(data_dir) / SYNTHETIC_MARKER
    if not marker.is_file():
        return {"synthetic": False}
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = {}
    return {"synthetic": True, **(recorded if isinstance(recorded, dict) else {})}


def grey_reference(items: Sequence[TrainingItem], cache: VolumeCache) -> dict:
    """The ``GreyReference`` of the training scans' preprocessed volumes (read once from ``cache``,
    which ``prepare_volumes`` filled), as config.json records it."""
    return GreyReference.fit(grey_histogram(cache.checked_levels(item.path)) for item in items).to_config()
