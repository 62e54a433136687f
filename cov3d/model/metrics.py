"""Validation metrics for both tasks: scikit-learn macro F1 and accuracy (paper §3.4).

``macro_f1`` is the one definition of the score (the demo's baseline uses it too);
``confusion_macro_f1`` is the same score read from a confusion matrix (figures of a run).

Predictions come from the model's logits (B, 6) = [presence x, z_0 .. z_4]:
presence is p = sigmoid(x) >= 0.5 (eq. 1); severity is the argmax of z_1..z_4, scored only on
scans annotated with a severity category (paper §3.3, last paragraph of eq. 5).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from fastai.learner import Metric
from numpy.typing import ArrayLike
from sklearn.metrics import accuracy_score, f1_score

from cov3d.dataset.layout import SEVERITY_CATEGORIES
from cov3d.logits import grade_outputs, presence_output

PRESENCE_THRESHOLD = 0.5


def presence_predictions(logits: torch.Tensor) -> np.ndarray:
    """(B, >=1) logits -> (B,) 0/1 predictions of COVID-19 presence."""
    return (torch.sigmoid(presence_output(logits).float()) >= PRESENCE_THRESHOLD).long().cpu().numpy()


def severity_predictions(logits: torch.Tensor) -> np.ndarray:
    """(B, 6) logits -> (B,) severity category 1..4 (argmax over z_1..z_4)."""
    return (grade_outputs(logits).float().argmax(dim=1) + 1).cpu().numpy()


def macro_f1(truth: ArrayLike, predicted: ArrayLike, labels: list[int]) -> float:
    """Unweighted mean of the F1 of each class in ``labels`` (a class never true nor predicted scores 0)."""
    return float(f1_score(truth, predicted, average="macro", labels=labels, zero_division=0))


def confusion_macro_f1(matrix: np.ndarray) -> float:
    """Macro F1 of a confusion matrix (a class with no true and no predicted scans scores 0)."""
    true_positive = np.diag(matrix).astype(float)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return float(f1.mean())


def presence_scores(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Macro F1 and accuracy of presence over all rows; target (B, 2) = [has_covid, severity]."""
    truth = target[:, 0].cpu().numpy()
    predicted = presence_predictions(logits)
    return {
        "presence_f1": macro_f1(truth, predicted, [0, 1]),
        "presence_accuracy": float(accuracy_score(truth, predicted)),
    }


def severity_scores(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Macro F1 and accuracy of severity over annotated rows only (NaN when there are none)."""
    annotated = (target[:, 1] > 0).cpu().numpy()
    if not annotated.any():
        return {"severity_f1": math.nan, "severity_accuracy": math.nan}
    truth = target[:, 1].cpu().numpy()[annotated]
    predicted = severity_predictions(logits)[annotated]
    return {
        "severity_f1": macro_f1(truth, predicted, list(SEVERITY_CATEGORIES)),
        "severity_accuracy": float(accuracy_score(truth, predicted)),
    }


class EpochScore(Metric):
    """A fastai metric that gathers a whole validation epoch, then reports one named score."""

    def __init__(self, score_name: str):
        self.score_name = score_name
        self.scorer = presence_scores if score_name.startswith("presence") else severity_scores

    def reset(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def accumulate(self, learn) -> None:
        self.logits.append(learn.pred.detach().float())  # left on the device: copied once, by ``value``
        self.targets.append(learn.yb[0].detach())

    @property
    def value(self) -> float:
        if not self.logits:
            return math.nan
        return self.scorer(torch.cat(self.logits).cpu(), torch.cat(self.targets).cpu())[self.score_name]

    @property
    def name(self) -> str:
        return self.score_name


def task_metrics(severity_factor: float) -> list[EpochScore]:
    """Metrics for the tasks a run trains: presence unless lambda = 1, severity unless lambda = 0."""
    names = []
    if severity_factor < 1:
        names += ["presence_f1", "presence_accuracy"]
    if severity_factor > 0:
        names += ["severity_f1", "severity_accuracy"]
    return [EpochScore(name) for name in names]
