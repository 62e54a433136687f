"""Figures of a training run, written to its folder: loss and F1 curves after every epoch, and
confusion matrices of both tasks on the validation set for the best checkpoints after training, and
their reliability diagrams before and after calibration (``reliability.png``, the bins of the ECE in
summary.json, from ``cov3d.training.evaluation``).

Files: ``curves.png``; ``confusion-presence.png`` / ``.csv`` (truth non-covid, covid x predicted,
from ``best-presence.safetensors``, p >= 0.5) and ``confusion-severity.png`` / ``.csv`` (truth
mild..critical x predicted, annotated validation scans only, argmax over z_1..z_4, from
``best-severity.safetensors``). Predictions are those of the validation metrics (one pass, no
reflection averaging, the run's precision), so the macro F1 of a matrix is the best F1 of its task in
``summary.json``. Under DDP each process predicts its share of the validation batches; only the first
process (rank 0) writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.torch_core import rank_distrib

from cov3d.atomic import write_csv_atomically
from cov3d.dataset.layout import PRESENCE_CLASSES, SEVERITY_LABELS
from cov3d.recipes import ONE_CHECKPOINT
from cov3d.runfiles import CONFUSION_STEMS, CURVES_FILE, RELIABILITY_FILE, TASK_METRICS
from cov3d.runtime import autocast
from cov3d.training.distributed import SINGLE_PROCESS, Distributed, gather_batches


class TrainingCurves(Callback):
    """After each epoch, redraw ``curves.png`` in the run folder from the Recorder's history."""

    order = 75  # after the Recorder (50) and the checkpoints (70)

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def after_epoch(self) -> None:
        if rank_distrib() != 0:
            return
        from cov3d.viz.figures import save_figure, training_curves

        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        history = {name: [float(row[i]) for row in self.recorder.values] for i, name in enumerate(names)}
        save_figure(training_curves(history), self.run_dir / CURVES_FILE)


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) int64 counts: rows true class 0..classes-1, columns predicted."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def validation_logits(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype | None = None,
                      dist: Distributed = SINGLE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, outputs) and targets (N, 2) of every batch of ``loader`` (eval mode, no grad, autocast
    to ``dtype``), gathered from every process in the unsharded order (every process calls this)."""
    model.eval()
    logits, targets = [], []
    with torch.no_grad():
        for volumes, target in loader:
            with autocast(device, dtype):
                logits.append(model(volumes.as_subclass(torch.Tensor).to(device)).float())
            targets.append(target.as_subclass(torch.Tensor))
    return torch.cat(gather_batches(dist, logits)), torch.cat(gather_batches(dist, targets))


def task_matrix(monitored: str, logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """The confusion matrix of one task (``presence_f1`` or ``severity_f1``), as the metrics score it."""
    from cov3d.model.metrics import presence_predictions, severity_predictions

    if monitored == "presence_f1":
        return confusion_matrix(targets[:, 0].numpy(), presence_predictions(logits), len(PRESENCE_CLASSES))
    annotated = (targets[:, 1] > 0).numpy()
    truth = targets[:, 1].numpy()[annotated] - 1
    return confusion_matrix(truth, severity_predictions(logits)[annotated] - 1, len(SEVERITY_LABELS))


def write_matrix_csv(path: Path, matrix: np.ndarray, labels: tuple[str, ...]) -> None:
    """Rows 'true <label>', columns 'predicted <label>'."""
    rows = [["true \\ predicted", *labels], *([label, *row.tolist()] for label, row in zip(labels, matrix))]
    write_csv_atomically(path, rows, "Free some space; the run's weights are complete.")


def write_confusion_matrices(run_dir: Path, loader, device: torch.device, dtype: torch.dtype | None = None,
                             dist: Distributed = SINGLE_PROCESS) -> dict[str, np.ndarray]:
    """Confusion matrices on ``loader`` (the validation DataLoader, sharded under DDP: every process calls
    this) for each best checkpoint of the run, autocast to ``dtype``; rank 0 writes ``confusion-<task>.png``
    and ``.csv`` and returns {monitored metric: matrix}, the others {}."""
    from cov3d.model.files import load_source
    from cov3d.model.metrics import confusion_macro_f1
    from cov3d.viz.figures import confusion_figure, save_figure

    run_dir = Path(run_dir)
    source = load_source(run_dir)
    matrices = {}
    for task, stem in CONFUSION_STEMS.items():
        model = source.build(task)
        if model is None:
            continue
        logits, targets = validation_logits(model.to(device), loader, device, dtype, dist)
        if not dist.is_main:
            continue
        monitored = TASK_METRICS[task]
        matrix = task_matrix(monitored, logits, targets)
        labels = PRESENCE_CLASSES if task == "presence" else SEVERITY_LABELS
        write_matrix_csv(run_dir / f"{stem}.csv", matrix, labels)
        kept = "the run's one checkpoint" if source.config.get("kept_weights") == ONE_CHECKPOINT else f"best {task} weights"
        title = f"{task} ({kept})\nmacro F1 {confusion_macro_f1(matrix):.3f}, validation scans: {int(matrix.sum())}"
        save_figure(confusion_figure(matrix, labels, title), run_dir / f"{stem}.png")
        matrices[monitored] = matrix
    return matrices


def write_reliability_diagram(run_dir: Path, calibrations: dict) -> Path | None:
    """``reliability.png``: one panel per calibrated task (``cov3d.model.calibration.TaskCalibration``,
    by task); None, and nothing written, when no task was calibrated."""
    if not calibrations:
        return None
    from cov3d.viz.figures import reliability_diagram, save_figure

    return save_figure(reliability_diagram(list(calibrations.values())), Path(run_dir) / RELIABILITY_FILE)
