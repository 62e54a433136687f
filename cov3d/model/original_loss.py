"""The original code's losses (rbturnbull/cov3d at c562971, its defaults): the ``original`` recipe
(``cov3d.recipes``, docs/faithfulness.md).

- Presence: BCE with ``pos_weight`` = n_non-covid / n_covid of the training scans, which weights
  only the y log p term: l_i = -(pos_weight y_i log p_i + (1 - y_i) log(1 - p_i)), y_i smoothed to
  1 - eps_p / eps_p as in eq. 2, averaged over the batch (1/B sum l_i). With eps_p > 0 this is not an
  item weight: a covid row's (1 - y) log(1 - p) term keeps weight 1.
- Severity: a 4-way cross entropy over mild..critical (logits z_1..z_4, no z_0), over the graded
  scans of the batch only, unweighted and unsmoothed, averaged over those scans; 0 for a batch that
  has none (most batches: with 258 graded of 1,992 training scans, 76 % of batches of two).

``OriginalCodeLoss`` is ``Cov3dLoss`` with either term replaced, so that each can be chosen alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cov3d.logits import GRADE_CLASSES, model_outputs
from cov3d.model.loss import Cov3dLoss, presence_targets
from cov3d.recipes import GRADED_ONLY, POS_WEIGHT, check_choice


def pos_weight_from_counts(counts: Sequence[int]) -> float:
    """``pos_weight`` of the presence BCE from the (non-covid, covid) training counts: n_non-covid / n_covid."""
    negatives, positives = (int(n) for n in counts)
    if negatives <= 0 or positives <= 0:
        raise ValueError(f"pos_weight needs covid and non-covid training scans, got counts {list(counts)}")
    return negatives / positives


def pos_weight_presence_loss(presence_logit: Tensor, has_covid: Tensor, smoothing: float, pos_weight: float) -> Tensor:
    """The original's presence BCE, averaged over the batch. presence_logit, has_covid: (B,). Returns a scalar."""
    x = presence_logit.float()
    y = presence_targets(has_covid, smoothing)
    losses = -(pos_weight * y * F.logsigmoid(x) + (1.0 - y) * F.logsigmoid(-x))
    return losses.sum() / max(losses.numel(), 1)


def graded_severity_loss(grade_logits: Tensor, severity: Tensor) -> Tensor:
    """The original's severity loss: 4-way cross entropy of the graded rows, averaged over them (0 without).

    grade_logits: (B, 4) = z_1..z_4; severity: (B,) in 0..4, 0 = not graded (or negative). Returns a scalar.
    """
    if grade_logits.ndim != 2 or grade_logits.shape[1] != GRADE_CLASSES:
        raise ValueError(f"the graded-only loss takes (B, {GRADE_CLASSES}) logits z_1..z_4, got {tuple(grade_logits.shape)}")
    z = grade_logits.float()
    graded = severity.long() > 0
    log_s = F.log_softmax(z, dim=1)
    classes = (severity.long() - 1).clamp_min(0)
    cross_entropy = -log_s.gather(1, classes[:, None])[:, 0]
    return torch.where(graded, cross_entropy, torch.zeros_like(cross_entropy)).sum() / graded.sum().clamp_min(1)


class OriginalCodeLoss(Cov3dLoss):
    """``Cov3dLoss`` (eq. 6's combination, the paper's terms) with the original code's presence term
    (``presence_weighting="pos-weight"``, then ``pos_weight`` replaces the presence class weights)
    and/or its graded-only severity term (``severity_loss="graded-only"``: logits (B, 5) = x, z_1..z_4)."""

    def __init__(self, *, severity_loss: str, presence_weighting: str, pos_weight: float = 1.0, **paper_terms) -> None:
        super().__init__(**paper_terms)
        check_choice("severity_loss", severity_loss)
        check_choice("presence_weighting", presence_weighting)
        self.graded_only = severity_loss == GRADED_ONLY
        self.pos_weight = float(pos_weight) if presence_weighting == POS_WEIGHT else None

    @property
    def outputs(self) -> int:
        return model_outputs(self.severity_factor, graded_only=self.graded_only)

    def presence_loss(self, presence_logit: Tensor, has_covid: Tensor) -> Tensor:
        if self.pos_weight is None:
            return super().presence_loss(presence_logit, has_covid)
        return pos_weight_presence_loss(presence_logit, has_covid, self.presence_smoothing, self.pos_weight)

    def severity_loss(self, severity_logits: Tensor, has_covid: Tensor, severity: Tensor) -> Tensor:
        """severity_logits: (B, 4) = z_1..z_4 when graded-only, else (B, 5) = z_0..z_4 (``Cov3dLoss``)."""
        if not self.graded_only:
            return super().severity_loss(severity_logits, has_covid, severity)
        return graded_severity_loss(severity_logits, severity * (has_covid.long() == 1))

