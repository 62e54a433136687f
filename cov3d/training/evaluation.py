"""Validation scores of a run's kept weights as ``cov3d infer`` uses them, after training.

The F1 recorded each epoch (``summary.json``'s ``best_scores``) comes from one pass of each scan, as
the training loop validates. The paper's inference averages each scan with its sagittal reflection
(§3.5), so the weights kept for a task are scored again that way: ``tta_scores`` in ``summary.json``,
the macro F1 of presence (from ``best-presence.safetensors``) and of severity (from
``best-severity.safetensors``, annotated scans only) on the validation set, with the same
probabilities ``cov3d infer`` computes (``cov3d.model.predictor.RunPredictor``), in the run's
precision. Under DDP each process predicts its share of the validation batches (``ShardedValidDL``)
and the first process (rank 0) scores the gathered predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cov3d.dataset.layout import SEVERITY_CATEGORIES
from cov3d.model.metrics import PRESENCE_THRESHOLD, macro_f1
from cov3d.runfiles import TASK_METRICS
from cov3d.training.distributed import SINGLE_PROCESS, Distributed, gather_batches


def kept_weights_scores(run_dir: Path, loader, device: torch.device, *, dtype: torch.dtype | None = None,
                        dist: Distributed = SINGLE_PROCESS, reflect: bool = True) -> dict[str, float]:
    """{``presence_f1``, ``severity_f1``}: macro F1 on ``loader`` (the validation DataLoader, sharded under
    DDP: every process calls this) of each task's kept weights, autocast to ``dtype`` (None: fp32) and
    averaged with the reflection unless ``reflect`` is off; a task without kept weights (or, for
    severity, without annotated scans) is left out. Processes other than rank 0 get {}."""
    from cov3d.model.files import load_source
    from cov3d.model.predictor import RunPredictor

    source = load_source(Path(run_dir))
    scores = {}
    for task, name in TASK_METRICS.items():
        if task not in source.states:
            continue
        predictor = RunPredictor(source, device, dtype, reflect=reflect, tasks=(task,))
        predicted, targets = [], []
        for volumes, target in loader:
            predicted.append(predictor.samples(volumes.as_subclass(torch.Tensor))[0])
            targets.append(target.as_subclass(torch.Tensor))
        predicted, targets = gather_batches(dist, predicted), gather_batches(dist, targets)
        if not dist.is_main:
            continue
        probabilities, truth = torch.cat(predicted).numpy(), torch.cat(targets).numpy()
        if task == "presence":
            scores[name] = macro_f1(truth[:, 0], (probabilities[:, 0] >= PRESENCE_THRESHOLD).astype(int), [0, 1])
        elif (truth[:, 1] > 0).any():
            annotated = truth[:, 1] > 0
            severity = np.argmax(probabilities[annotated, 1:], axis=1) + 1
            scores[name] = macro_f1(truth[annotated, 1], severity, list(SEVERITY_CATEGORIES))
    return scores
