"""The original code's losses (the ``original`` recipe) against values computed by hand from its formulas:
presence BCE with pos_weight (on the y log p term only, eps_p-smoothed targets, batch mean) and the
4-way unweighted, unsmoothed cross entropy over the graded scans of a batch."""

import math

import pytest
import torch

from cov3d.model.loss import Cov3dLoss, class_weights
from cov3d.model.original_loss import OriginalCodeLoss, graded_severity_loss, pos_weight_from_counts

TABLE1_COUNTS = [1110, 882]
"""Training scans (non-covid, covid), paper Table 1."""


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


def log_softmax(z: list[float], k: int) -> float:
    return z[k] - math.log(sum(math.exp(v) for v in z))


def original_loss(**options) -> OriginalCodeLoss:
    return OriginalCodeLoss(severity_loss="graded-only", presence_weighting="pos-weight", severity_smoothing=0.0, **options)


def test_pos_weight_is_non_covid_over_covid():
    assert pos_weight_from_counts(TABLE1_COUNTS) == pytest.approx(1110 / 882)
    with pytest.raises(ValueError):
        pos_weight_from_counts([5, 0])


def test_pos_weight_presence_by_hand_with_smoothing():
    pos_weight, eps = 1.2585, 0.1
    x, has_covid = [0.3, -1.2, 2.5], [1, 0, 1]
    by_hand = 0.0
    for xi, yi in zip(x, has_covid):
        target = 1 - eps if yi else eps
        by_hand += -(pos_weight * target * log_sigmoid(xi) + (1 - target) * log_sigmoid(-xi))
    by_hand /= 3
    loss = original_loss(severity_factor=0.0, presence_smoothing=eps, pos_weight=pos_weight)
    logits = torch.tensor(x)[:, None]
    target = torch.tensor([[c, 0] for c in has_covid])
    assert loss(logits, target).item() == pytest.approx(by_hand, rel=1e-6)


def test_pos_weight_is_not_an_item_weight_and_its_ratio_to_the_papers_loss():
    """At p = 0.5 (x = 0) each log term is -log 2: the original's covid row is log 2 (0.9 pw + 0.1), the
    paper's w_covid log 2; with Table 1's counts, w = 1992 / (2 n) and pw = 1110 / 882."""
    original = original_loss(severity_factor=0.0, presence_smoothing=0.1, pos_weight=pos_weight_from_counts(TABLE1_COUNTS))
    paper = Cov3dLoss(severity_factor=0.0, presence_smoothing=0.1, presence_weights=class_weights(TABLE1_COUNTS))
    zero = torch.zeros(1, 1)
    covid, non_covid = torch.tensor([[1, 0]]), torch.tensor([[0, 0]])
    assert original(zero, covid).item() == pytest.approx(math.log(2) * (0.9 * 1110 / 882 + 0.1), rel=1e-6)
    assert original(zero, non_covid).item() == pytest.approx(math.log(2) * (0.1 * 1110 / 882 + 0.9), rel=1e-6)
    # cov3d's (paper) loss over the original's: 1.129252 / 1.232653 and 0.897297 / 1.025850
    assert (paper(zero, covid) / original(zero, covid)).item() == pytest.approx(0.916115, abs=1e-5)
    assert (paper(zero, non_covid) / original(zero, non_covid)).item() == pytest.approx(0.874687, abs=1e-5)
    # without smoothing, pos_weight is the covid rows' weight (non-covid rows: 1)
    unsmoothed = original_loss(severity_factor=0.0, presence_smoothing=0.0, pos_weight=2.0)
    assert unsmoothed(torch.tensor([[0.7]]), covid).item() == pytest.approx(-2.0 * log_sigmoid(0.7), rel=1e-6)


def test_graded_only_cross_entropy_by_hand():
    """Rows: negative, ungraded covid, moderate, critical. Only the last two count, unweighted, unsmoothed."""
    grades = [[0.5, -1.0, 2.0, 0.0], [1.5, 0.3, -0.7, 0.2], [0.1, 0.4, -0.2, 1.1], [-0.3, 0.0, 0.9, 2.2]]
    target = torch.tensor([[0, 0], [1, 0], [1, 2], [1, 4]])
    by_hand = -(log_softmax(grades[2], 1) + log_softmax(grades[3], 3)) / 2
    logits = torch.cat([torch.tensor([[0.4], [-0.1], [0.8], [1.3]]), torch.tensor(grades)], dim=1)  # (B, 1 + 4)
    loss = original_loss(severity_factor=1.0, presence_smoothing=0.0)
    assert loss(logits, target).item() == pytest.approx(by_hand, rel=1e-6)
    assert graded_severity_loss(torch.tensor(grades), target[:, 1]).item() == pytest.approx(by_hand, rel=1e-6)


def test_a_batch_without_graded_scans_has_no_severity_loss():
    logits = torch.tensor([[0.4, 1.0, 2.0, 3.0, 4.0], [-0.2, 0.0, 0.0, 5.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0, 0], [1, 0]])
    total = original_loss(severity_factor=1.0, presence_smoothing=0.0)(logits, target)
    total.backward()
    assert total.item() == 0.0 and logits.grad.abs().sum().item() == 0.0


def test_combined_by_hand_and_one_plus_four_outputs():
    loss = original_loss(severity_factor=0.1, presence_smoothing=0.1, pos_weight=1.5)
    assert loss.outputs == 5 and original_loss(severity_factor=0.0, presence_smoothing=0.1).outputs == 1
    grades = [0.2, 1.0, -0.5, 0.3]
    logits = torch.tensor([[1.2, *grades], [-0.4, 0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[1, 2], [0, 0]])
    presence = (-(1.5 * 0.9 * log_sigmoid(1.2) + 0.1 * log_sigmoid(-1.2))
                - (1.5 * 0.1 * log_sigmoid(-0.4) + 0.9 * log_sigmoid(0.4))) / 2
    severity = -log_softmax(grades, 1)
    assert loss(logits, target).item() == pytest.approx(0.9 * presence + 0.1 * severity, rel=1e-6)
    with pytest.raises(ValueError, match="z_1..z_4"):
        graded_severity_loss(torch.zeros(2, 5), torch.tensor([1, 0]))


def test_each_original_term_alone_keeps_the_papers_other_term():
    """pos-weight presence with the paper's severity loss (1 + 5 outputs), and the reverse."""
    logits, target = torch.tensor([[0.3, 0.1, 0.2, -0.4, 0.5, 0.0]]), torch.tensor([[1, 3]])
    paper = Cov3dLoss(severity_factor=0.5, presence_smoothing=0.0, severity_smoothing=0.0)
    mixed = OriginalCodeLoss(severity_loss="every-scan", presence_weighting="pos-weight", pos_weight=1.0,
                             severity_factor=0.5, presence_smoothing=0.0, severity_smoothing=0.0)
    assert mixed.outputs == 6 and mixed(logits, target).item() == pytest.approx(paper(logits, target).item(), rel=1e-6)
    graded = OriginalCodeLoss(severity_loss="graded-only", presence_weighting="item-weights",
                              severity_factor=0.5, presence_smoothing=0.0, severity_smoothing=0.0)
    by_hand = 0.5 * -log_sigmoid(0.3) + 0.5 * -log_softmax([0.1, 0.2, -0.4, 0.5], 2)
    assert graded(logits[:, :5], target).item() == pytest.approx(by_hand, rel=1e-6)


def test_paper_severity_weights_from_the_table_counts():
    """cov3d's ungraded weight relative to negatives from the training counts: 1110 / (882 - 258) = 1.78
    (the original's hard-coded weights, from the mis-summed total 2,292, give 1110 / 924 = 1.20)."""
    weights = class_weights([1110, 882 - 258, 85, 62, 85, 26])
    assert weights[1] / weights[0] == pytest.approx(1110 / 624)
    assert 1110 / 624 == pytest.approx(1.7788, abs=1e-4)
