"""The Cov3d loss: presence BCE, severity cross entropy and their combination (paper eqs. 1-6).

Conventions (shared with the DataBlock and the metrics):
- ``target`` has shape (B, 2): ``target[:, 0]`` = has_covid in {0, 1}, ``target[:, 1]`` = severity in
  0..4 (0 = negative or not annotated, 1 mild, 2 moderate, 3 severe, 4 critical).
- ``logits`` has shape (B, 6): ``logits[:, 0]`` is the presence logit x_i (eq. 1) and
  ``logits[:, 1:6]`` are the severity logits z_0..z_4, z_0 = "COVID negative" (eq. 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cov3d.dataset.layout import PRESENCE_CLASSES, SEVERITY_GROUPS
from cov3d.limits import SMOOTHING
from cov3d.logits import GRADES, SEVERITY_CLASSES, model_outputs, presence_output, severity_outputs
from cov3d.settings import PRESENCE_AVERAGING, TRAIN_DEFAULTS

_UNANNOTATED_GROUP = SEVERITY_GROUPS.index("positive-unannotated")
_FIRST_SEVERITY_GROUP = SEVERITY_GROUPS.index("mild")
TARGET_RULES = (f"Cov3dLoss targets: has_covid must be 0 or 1, severity must lie in 0..{SEVERITY_CLASSES - 1}, "
                "and a covid-negative scan must have severity 0")


def _check_smoothing(smoothing: float, name: str) -> None:
    if SMOOTHING.problem(smoothing):
        raise ValueError(f"{name} must be {SMOOTHING.describe()}, got {smoothing}")


def presence_targets(has_covid: Tensor, smoothing: float) -> Tensor:
    """Label-smoothed presence targets y_i: 1 - eps_p for covid rows, eps_p for non-covid rows.

    has_covid: (B,) in {0, 1}. Returns a float tensor (B,).
    """
    _check_smoothing(smoothing, "presence smoothing")
    positive = has_covid.float()
    return positive * (1.0 - smoothing) + (1.0 - positive) * smoothing


def severity_smoothing_matrix(smoothing: float) -> Tensor:
    """(5, 5) matrix whose row c is the smoothed target distribution of class c.

    The true class keeps 1 - eps_s and eps_s is split equally between its neighbours on the chain
    negative-mild-moderate-severe-critical (paper sec. 3.3); an end class gives all of eps_s to its
    single neighbour.
    """
    _check_smoothing(smoothing, "severity smoothing")
    matrix = torch.eye(SEVERITY_CLASSES) * (1.0 - smoothing)
    for c in range(SEVERITY_CLASSES):
        neighbours = [n for n in (c - 1, c + 1) if 0 <= n < SEVERITY_CLASSES]
        for n in neighbours:
            matrix[c, n] = smoothing / len(neighbours)
    return matrix


def severity_target_distribution(severity_class: Tensor, smoothing: float) -> Tensor:
    """Smoothed target distributions y_{i,c} of eq. 4.

    severity_class: (B,) integers in 0..4 (0 = COVID negative, 1..4 mild..critical).
    Returns (B, 5) float rows summing to one.
    """
    classes = severity_class.long()
    if classes.numel() and (classes.min() < 0 or classes.max() >= SEVERITY_CLASSES):
        raise ValueError(f"severity classes must lie in 0..{SEVERITY_CLASSES - 1}")
    return severity_smoothing_matrix(smoothing).to(classes.device)[classes]


def _target_problems(positive: Tensor, grade: Tensor) -> Tensor:
    """() bool on the targets' device: whether a has_covid is not 0/1, a grade lies outside 0..4, or a
    negative scan has a grade (the rules ``severity_group`` states), computed without waiting on the host."""
    return (((positive != 0) & (positive != 1)) | (grade < 0) | (grade >= SEVERITY_CLASSES)
            | ((positive == 0) & (grade != 0))).any()


def severity_group(has_covid: Tensor, severity: Tensor) -> Tensor:
    """Index into SEVERITY_GROUPS for each scan, used to pick its severity weight.

    has_covid: (B,) in {0, 1}; severity: (B,) in 0..4 (0 = not annotated, or negative).
    Returns (B,) long: 0 negative, 1 positive-unannotated, 2..5 mild..critical.
    A negative scan must have severity 0.
    """
    positive = has_covid.long()
    grade = severity.long()
    if positive.numel():
        if ((positive != 0) & (positive != 1)).any():
            raise ValueError("has_covid must be 0 or 1")
        if grade.min() < 0 or grade.max() >= SEVERITY_CLASSES:
            raise ValueError(f"severity must lie in 0..{SEVERITY_CLASSES - 1}")
        if ((positive == 0) & (grade != 0)).any():
            raise ValueError("a covid-negative scan cannot have a severity grade (expected severity 0)")
    return _checked_group(positive, grade)


def _checked_group(positive: Tensor, grade: Tensor) -> Tensor:
    """``severity_group`` of targets already checked: (B,) long has_covid and grade -> (B,) group index."""
    annotated_group = grade + (_FIRST_SEVERITY_GROUP - 1)
    positive_group = torch.where(grade == 0, torch.full_like(grade, _UNANNOTATED_GROUP), annotated_group)
    return torch.where(positive == 1, positive_group, torch.zeros_like(grade))


def class_weights(counts: Sequence[int]) -> list[float]:
    """Balancing weights w_k = N / (K * n_k) for class counts n_k.

    N is the total count and K the number of classes with n_k > 0, so that every present class
    carries the same total weight (N / K) and the weights average to one over the scans (the
    scikit-learn "balanced" rule). A class with n_k = 0 gets weight 0.
    """
    values = [int(n) for n in counts]
    if any(n < 0 for n in values):
        raise ValueError(f"class counts must be non-negative, got {values}")
    total = sum(values)
    if total == 0:
        raise ValueError("class counts are all zero: there is nothing to balance")
    present = sum(1 for n in values if n > 0)
    return [total / (present * n) if n > 0 else 0.0 for n in values]


def _weights_tensor(weights: Sequence[float] | Tensor | None, length: int, name: str) -> Tensor:
    if weights is None:
        return torch.ones(length)
    tensor = torch.as_tensor(weights, dtype=torch.float32).detach().clone().flatten()
    if tensor.numel() != length:
        raise ValueError(f"{name} needs {length} values, got {tensor.numel()}")
    if not torch.isfinite(tensor).all() or (tensor < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {tensor.tolist()}")
    return tensor


def _weighted_mean(losses: Tensor, weights: Tensor) -> Tensor:
    """sum w_i l_i / sum w_i; a batch whose weights are all zero contributes 0."""
    return (weights * losses).sum() / weights.sum().clamp_min(torch.finfo(losses.dtype).tiny)


def _batch_mean(losses: Tensor, weights: Tensor) -> Tensor:
    """1/B sum w_i l_i over the B rows of the batch (0 for an empty batch)."""
    return (weights * losses).sum() / max(losses.numel(), 1)


class Cov3dLoss(nn.Module):
    """Combined loss (1 - lambda) l_covid + lambda l_severity (eq. 6).

    l_covid is the weighted BCE of eq. 2 with smoothed targets; l_severity is the weighted cross
    entropy of eq. 4 (negative and annotated scans, neighbour smoothing) or eq. 5 (positive scans
    without a grade, no smoothing).

    The paper does not say how the weighted terms of a batch are combined. By default they are
    combined as in the original code at the paper's time: presence terms over the batch size,
    1/B sum w_i l_i (so the class weights still count in a batch whose scans share a class), severity
    terms over their weights, sum w_i l_i / sum w_i. ``presence_averaging="weighted"`` averages the
    presence terms over their weights as well.
    """

    def __init__(
        self,
        *,
        severity_factor: float = TRAIN_DEFAULTS.severity_factor,
        presence_smoothing: float = TRAIN_DEFAULTS.presence_smoothing,
        severity_smoothing: float = TRAIN_DEFAULTS.severity_smoothing,
        presence_weights: Sequence[float] | Tensor | None = None,
        severity_weights: Sequence[float] | Tensor | None = None,
        presence_averaging: str = TRAIN_DEFAULTS.presence_averaging,
    ) -> None:
        super().__init__()
        if presence_averaging not in PRESENCE_AVERAGING:
            raise ValueError(f"presence_averaging must be one of {PRESENCE_AVERAGING}, got {presence_averaging!r}")
        self.presence_averaging = presence_averaging
        if not 0.0 <= severity_factor <= 1.0:
            raise ValueError(f"severity_factor (lambda) must lie in [0, 1], got {severity_factor}")
        _check_smoothing(presence_smoothing, "presence_smoothing")
        _check_smoothing(severity_smoothing, "severity_smoothing")
        self.severity_factor = float(severity_factor)
        self.presence_smoothing = float(presence_smoothing)
        self.severity_smoothing = float(severity_smoothing)
        self.register_buffer(
            "presence_weights", _weights_tensor(presence_weights, len(PRESENCE_CLASSES), "presence_weights")
        )
        self.register_buffer(
            "severity_weights", _weights_tensor(severity_weights, len(SEVERITY_GROUPS), "severity_weights")
        )
        # Built once and moved with the loss: no matrix built on the host and uploaded at every call.
        self.register_buffer("severity_targets", severity_smoothing_matrix(self.severity_smoothing), persistent=False)

    @property
    def outputs(self) -> int:
        """Logits the model must produce (``model_outputs``)."""
        return model_outputs(self.severity_factor)

    def presence_loss(self, presence_logit: Tensor, has_covid: Tensor) -> Tensor:
        """Batch average of eq. 2 (``presence_averaging``). presence_logit, has_covid: (B,). Returns a scalar."""
        x = presence_logit.float()
        y = presence_targets(has_covid, self.presence_smoothing)
        # log p = logsigmoid(x) and log(1 - p) = logsigmoid(-x), stable for large |x|.
        losses = -(y * F.logsigmoid(x) + (1.0 - y) * F.logsigmoid(-x))
        weights = self.presence_weights.to(x.device)[has_covid.long()]
        average = _batch_mean if self.presence_averaging == "batch" else _weighted_mean
        return average(losses, weights)

    def severity_loss(self, severity_logits: Tensor, has_covid: Tensor, severity: Tensor) -> Tensor:
        """Weighted mean of eqs. 4/5. severity_logits: (B, 5) = z_0..z_4; has_covid, severity: (B,)."""
        z = severity_logits.float()
        group = _checked_group(has_covid.long(), severity.long())  # the targets were checked by ``forward``
        log_s = F.log_softmax(z, dim=1)
        # Negative scans are class 0; annotated positives keep their grade 1..4.
        classes = severity.long() * (has_covid.long() == 1)
        targets = self.severity_targets.to(z.device)[classes]
        cross_entropy = -(targets * log_s).sum(dim=1)
        positive_any_grade = -(torch.logsumexp(z[:, GRADES], dim=1) - torch.logsumexp(z, dim=1))
        losses = torch.where(group == _UNANNOTATED_GROUP, positive_any_grade, cross_entropy)
        return _weighted_mean(losses, self.severity_weights.to(z.device)[group])

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits: (B, 6) (or (B, 1) when lambda = 0); target: (B, 2). Returns a scalar."""
        if target.ndim != 2 or target.shape[1] != 2:
            raise ValueError(f"target must have shape (B, 2) = (has_covid, severity), got {tuple(target.shape)}")
        if logits.ndim != 2 or logits.shape[0] != target.shape[0] or logits.shape[1] < self.outputs:
            raise ValueError(
                f"logits must have shape (B, {self.outputs}) matching target (B = {target.shape[0]}), "
                f"got {tuple(logits.shape)}"
            )
        has_covid = target[:, 0].round().long()
        grade = target[:, 1].round().long()
        # One check of every rule on the device, without a host wait (an error at once on a CPU,
        # a device-side assertion on a GPU); the loss itself never waits on the host.
        torch._assert_async(~_target_problems(has_covid, grade), TARGET_RULES)
        total = logits.new_zeros((), dtype=torch.float32)
        if self.severity_factor < 1.0:
            total = total + (1.0 - self.severity_factor) * self.presence_loss(presence_output(logits), has_covid)
        if self.severity_factor > 0.0:
            total = total + self.severity_factor * self.severity_loss(severity_outputs(logits), has_covid, grade)
        return total
