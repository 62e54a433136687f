"""Validation scores and calibration of a run's kept weights as ``cov3d infer`` uses them, after training.

The F1 recorded each epoch (``summary.json``'s ``best_scores``) comes from one pass of each scan, as
the training loop validates. The paper's inference averages each scan with its sagittal reflection
(§3.5), so the weights kept for a task are run again that way, once, on the validation set
(``kept_weights_predictions``: the task logits of ``cov3d.model.predictor.RunPredictor``, fp32, as
``cov3d infer`` computes them, in the run's precision; for a lambda = 1 run presence comes from the severity weights,
P(covid) = s_1 + .. + s_4). From these logits, without another pass of the network:

- ``tta_scores`` in ``summary.json``: the macro F1 of presence (from ``best-presence.safetensors``)
  and of severity (from ``best-severity.safetensors``, annotated scans only);
- ``calibration``: each task's temperature (``cov3d.model.calibration``), fitted on the same scans
  (all of them for presence, the annotated ones for severity) and recorded in ``config.json``, with
  the ECE, Brier score and NLL before and after, and the reliability diagram ``reliability.png``.

Under DDP each process predicts its share of the validation batches (``ShardedValidDL``) and the
first process (rank 0) scores and calibrates on the gathered predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cov3d.dataset.layout import SEVERITY_CATEGORIES
from cov3d.model.calibration import CALIBRATION_BINS, TaskCalibration, calibrate_task
from cov3d.model.files import TEMPERATURES_KEY
from cov3d.model.metrics import macro_f1
from cov3d.runfiles import TASK_METRICS
from cov3d.training.callbacks import record_in_config
from cov3d.training.distributed import SINGLE_PROCESS, Distributed, gather_batches
from cov3d.training.run_figures import write_reliability_diagram

EVALUATION_PASSES_PER_TASK = 3
"""Validation passes after the fit for each task's kept weights (what ``StepTimer`` counts): one for its
confusion matrix (``cov3d.training.run_figures``), two here for the scan and its reflection."""
TaskPredictions = tuple[np.ndarray, np.ndarray]
"""A task's validation predictions: task logits (N, 5) [l, g_1..g_4] and targets (N, 2) [has_covid, severity]."""


def kept_weights_predictions(run_dir: Path, loader, device: torch.device, *, dtype: torch.dtype | None = None,
                             dist: Distributed = SINGLE_PROCESS, reflect: bool = True) -> dict[str, TaskPredictions]:
    """{task: predictions} on ``loader`` (the validation DataLoader, sharded under DDP: every process
    calls this) of each task's kept weights, autocast to ``dtype`` (None: fp32) and averaged with the
    reflection unless ``reflect`` is off; a task the run cannot predict is left out. Processes other than
    rank 0 get {}."""
    from cov3d.model.files import load_source
    from cov3d.model.predictor import RunPredictor

    source = load_source(Path(run_dir))
    predictor = RunPredictor(source, device, dtype, reflect=reflect, tasks=source.tasks, calibrated=False)
    logits, targets = [], []
    for volumes, target in loader:  # each task's kept weights once per batch (both tasks from one for lambda = 1)
        logits.append(predictor.task_logits(volumes.as_subclass(torch.Tensor)))
        targets.append(target.as_subclass(torch.Tensor))
    logits, targets = gather_batches(dist, logits), gather_batches(dist, targets)
    if not dist.is_main:
        return {}
    predictions = torch.cat(logits).numpy(), torch.cat(targets).numpy()
    return {task: predictions for task in predictor.predicted_tasks}


def task_data(task: str, predictions: TaskPredictions) -> tuple[np.ndarray, np.ndarray]:
    """The logits and truth a task is scored and calibrated on: presence (N,) logits l and (N,) has_covid
    for every scan; severity (M, 4) logits g and (M,) grade 0..3 (mild..critical) of the M annotated scans."""
    logits, targets = predictions
    if task == "presence":
        return logits[:, 0], targets[:, 0].round().astype(int)
    annotated = targets[:, 1] > 0
    return logits[annotated, 1:], targets[annotated, 1].round().astype(int) - 1


def validation_scores(predictions: dict[str, TaskPredictions]) -> dict[str, float]:
    """{``presence_f1``, ``severity_f1``}: the macro F1 of each task's decisions (presence l >= 0, i.e.
    P(covid) >= 0.5; severity the argmax of g); severity is left out without annotated scans."""
    scores = {}
    for task, task_predictions in predictions.items():
        logits, truth = task_data(task, task_predictions)
        if not len(truth):
            continue
        if task == "presence":
            scores[TASK_METRICS[task]] = macro_f1(truth, (logits >= 0).astype(int), [0, 1])
        else:
            scores[TASK_METRICS[task]] = macro_f1(truth + 1, logits.argmax(axis=1) + 1, list(SEVERITY_CATEGORIES))
    return scores


def calibrate(predictions: dict[str, TaskPredictions]) -> dict[str, TaskCalibration]:
    """{task: its temperature and scores} for each task with validation scans to fit on."""
    fitted = {task: calibrate_task(task, *task_data(task, task_predictions)) for task, task_predictions in predictions.items()}
    return {task: result for task, result in fitted.items() if result is not None}


def calibration_summary(calibrations: dict[str, TaskCalibration]) -> dict:
    """What summary.json records under ``calibration``: how the ECE is binned, and each task's entry."""
    return {
        "ece_bins": f"{CALIBRATION_BINS} equal-width bins of top-label confidence on [0, 1]",
        **{task: result.summary() for task, result in calibrations.items()},
    }


def evaluate_kept_weights(run_dir: Path, loader, device: torch.device, *, dtype: torch.dtype | None = None,
                          dist: Distributed = SINGLE_PROCESS) -> dict:
    """After training (every process calls this): predict the validation set with the kept weights once,
    record each task's temperature in config.json, draw ``reliability.png``, and return summary.json's
    ``tta_scores`` and ``calibration`` (empty on processes other than the first)."""
    predictions = kept_weights_predictions(run_dir, loader, device, dtype=dtype, dist=dist)
    if not dist.is_main:
        return {}
    calibrations = calibrate(predictions)
    record_in_config(run_dir, TEMPERATURES_KEY, {task: result.temperature for task, result in calibrations.items()})
    write_reliability_diagram(run_dir, calibrations)
    return {"tta_scores": validation_scores(predictions), "calibration": calibration_summary(calibrations)}
