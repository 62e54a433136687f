"""What a run used, for config.json: library versions and a fingerprint of the labelled dataset."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from importlib import metadata

import torch

from cov3d import __version__
from cov3d.dataset.scans import list_slices
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
