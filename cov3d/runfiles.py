"""The files of a training run and of a model, by name: what ``cov3d train`` writes into a run
folder, and what ``cov3d export`` and ``cov3d infer`` read. Torch-free, so that the output guards
(``cov3d.outputs``) and the light commands never import training code.
"""

from __future__ import annotations

import os
from pathlib import Path

from cov3d.atomic import leftover_temporaries

CONFIG_FILE = "config.json"
"""The run's settings and everything needed to rebuild its model."""
TASKS = ("presence", "severity")
"""The two tasks whose best weights a run keeps."""
TASK_METRICS = {"presence": "presence_f1", "severity": "severity_f1"}
"""The validation score that picks each task's kept weights."""
WEIGHTS_FILES = {"presence": "best-presence.safetensors", "severity": "best-severity.safetensors"}
"""The kept weights of a run folder, by task."""
WEIGHTS_BY_METRIC = {TASK_METRICS[task]: name for task, name in WEIGHTS_FILES.items()}
"""The kept weights by the score that picks them (config.json's ``checkpoints``)."""
RESUME_FILE = "checkpoint.pth"
"""The end-of-epoch state that ``cov3d train --resume`` continues from."""
METRICS_FILE = "metrics.csv"
"""Losses and scores of every epoch."""
SUMMARY_FILE = "summary.json"
"""Best scores and epochs, written when training ends."""
CURVES_FILE = "curves.png"
"""Loss and F1 curves, redrawn after every epoch."""
RELIABILITY_FILE = "reliability.png"
"""Reliability diagrams of both tasks on the validation set, before and after calibration."""
CONFUSION_STEMS = {"presence": "confusion-presence", "severity": "confusion-severity"}
"""Confusion matrices of each task's kept weights on the validation set (stems of a figure and a table)."""
CONFUSION_SUFFIXES = (".png", ".csv")
MODEL_SUFFIX = ".safetensors"
"""Weights and exported model files."""


def run_file_names() -> set[str]:
    """The names of the files ``cov3d train`` writes into a run folder."""
    confusion = {f"{stem}{suffix}" for stem in CONFUSION_STEMS.values() for suffix in CONFUSION_SUFFIXES}
    return {CONFIG_FILE, RESUME_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE, RELIABILITY_FILE, *WEIGHTS_FILES.values(),
            *confusion}


def leftover_run_temporaries(folder: Path) -> list[Path]:
    """Temporary files of the run's files (``cov3d.atomic.leftover_temporaries``) in ``folder``: what a
    run killed while writing one of them left there."""
    return sorted(temp for name in run_file_names() for temp in leftover_temporaries(Path(folder) / name))


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a cov3d run: ``config.json`` beside weights or a checkpoint."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and any(
        (folder / name).is_file() for name in (RESUME_FILE, *WEIGHTS_FILES.values())
    )


def existing_run_files(folder: Path) -> list[Path]:
    """The files of a run (``run_file_names``) present in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(folder / name for name in run_file_names() if os.path.lexists(folder / name))


PREDICTIONS_RECORD_SUFFIX = ".cov3d.json"
"""Beside a predictions CSV ``preds.csv``: ``preds.csv.cov3d.json``, what made its rows (models and settings)."""


def predictions_record(csv_path: Path) -> Path:
    """The record of what made the rows of the predictions CSV ``csv_path`` (``PREDICTIONS_RECORD_SUFFIX``)."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.name + PREDICTIONS_RECORD_SUFFIX)
