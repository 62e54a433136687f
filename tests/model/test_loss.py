"""Cov3dLoss against hand-written expressions of the paper's eqs. 1-6 (plain math, no module helpers)."""

import math

import numpy as np
import pytest
import torch

from cov3d.model.loss import (
    SEVERITY_GROUPS,
    Cov3dLoss,
    class_weights,
    presence_targets,
    severity_group,
    severity_target_distribution,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(x: float, y: float) -> float:
    """-(y log p + (1 - y) log(1 - p)) with p = sigmoid(x), eqs. 1-2 without the weight."""
    p = sigmoid(x)
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def softmax(z: list[float]) -> list[float]:
    exps = [math.exp(v) for v in z]
    total = sum(exps)
    return [e / total for e in exps]


def cross_entropy(z: list[float], y: list[float]) -> float:
    """-sum_c y_c log s_c, eq. 4 without the weight."""
    return -sum(yc * math.log(sc) for yc, sc in zip(y, softmax(z)) if yc > 0)


def any_grade(z: list[float]) -> float:
    """-log(s_1 + s_2 + s_3 + s_4), eq. 5 without the weight."""
    return -math.log(sum(softmax(z)[1:]))


def weighted_mean(losses: list[float], weights: list[float]) -> float:
    return sum(w * v for w, v in zip(weights, losses)) / sum(weights)


def batch_mean(losses: list[float], weights: list[float]) -> float:
    """1/B sum w_i l_i: the original code's presence averaging."""
    return sum(w * v for w, v in zip(weights, losses)) / len(losses)


AVERAGE = {"batch": batch_mean, "weighted": weighted_mean}


# Smoothed severity targets for eps_s = 0.1, typed by hand (chain negative-mild-moderate-severe-critical).
SMOOTHED_01 = {
    0: [0.9, 0.1, 0.0, 0.0, 0.0],
    1: [0.05, 0.9, 0.05, 0.0, 0.0],
    2: [0.0, 0.05, 0.9, 0.05, 0.0],
    3: [0.0, 0.0, 0.05, 0.9, 0.05],
    4: [0.0, 0.0, 0.0, 0.1, 0.9],
}

# Rows: (presence logit x, z_0..z_4, has_covid, severity)
ROWS = [
    (2.0, [1.0, 0.2, -0.5, 0.3, 0.0], 0, 0),  # negative
    (-0.7, [0.5, 1.0, -1.0, 0.0, 0.2], 1, 0),  # positive, no severity annotation
    (0.4, [-0.3, 0.8, 0.1, -0.2, 0.6], 1, 1),  # mild
    (1.3, [0.0, -0.4, 0.2, 0.9, 1.5], 1, 4),  # critical
    (-1.1, [0.3, 0.3, 1.2, -0.8, 0.1], 1, 2),  # moderate
]
PRESENCE_W = [0.8, 1.5]  # (negative, positive)
SEVERITY_W = [0.5, 0.7, 2.0, 1.2, 1.0, 3.0]  # as SEVERITY_GROUPS
GROUP_OF_ROW = [0, 1, 2, 5, 3]  # negative, unannotated, mild, critical, moderate


def batch(rows=ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[x, *z] for x, z, _, _ in rows], dtype=torch.float32)
    target = torch.tensor([[c, s] for _, _, c, s in rows], dtype=torch.long)
    return logits, target


def expected_presence(eps_p: float, weights: list[float], averaging: str = "batch") -> float:
    losses = [bce(x, (1 - eps_p) if c == 1 else eps_p) for x, _, c, _ in ROWS]
    return AVERAGE[averaging](losses, [weights[c] for _, _, c, _ in ROWS])


def expected_severity(targets: dict[int, list[float]], weights: list[float]) -> float:
    losses = []
    for _x, z, c, s in ROWS:
        if c == 1 and s == 0:
            losses.append(any_grade(z))
        else:
            losses.append(cross_entropy(z, targets[s]))
    return weighted_mean(losses, [weights[g] for g in GROUP_OF_ROW])


ONE_HOT = {c: [1.0 if k == c else 0.0 for k in range(5)] for c in range(5)}


def test_presence_targets_smoothed_by_hand():
    got = presence_targets(torch.tensor([1, 0, 1]), 0.1)
    np.testing.assert_allclose(got.numpy(), [0.9, 0.1, 0.9], rtol=1e-6)
    np.testing.assert_allclose(presence_targets(torch.tensor([1, 0]), 0.0).numpy(), [1.0, 0.0])


@pytest.mark.parametrize("cls", range(5))
def test_severity_targets_by_hand(cls):
    got = severity_target_distribution(torch.tensor([cls]), 0.1)
    np.testing.assert_allclose(got.numpy()[0], SMOOTHED_01[cls], atol=1e-7)
    unsmoothed = severity_target_distribution(torch.tensor([cls]), 0.0)
    np.testing.assert_array_equal(unsmoothed.numpy()[0], ONE_HOT[cls])


def test_severity_targets_batch_and_range():
    got = severity_target_distribution(torch.tensor([2, 0, 4]), 0.2)
    expected = [[0, 0.1, 0.8, 0.1, 0], [0.8, 0.2, 0, 0, 0], [0, 0, 0, 0.2, 0.8]]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)
    with pytest.raises(ValueError):
        severity_target_distribution(torch.tensor([5]), 0.1)


def test_severity_group():
    has_covid = torch.tensor([0, 1, 1, 1, 1, 1])
    severity = torch.tensor([0, 0, 1, 2, 3, 4])
    assert severity_group(has_covid, severity).tolist() == [0, 1, 2, 3, 4, 5]
    assert [SEVERITY_GROUPS[g] for g in (0, 1, 5)] == ["negative", "positive-unannotated", "critical"]
    with pytest.raises(ValueError, match="negative"):
        severity_group(torch.tensor([0]), torch.tensor([2]))


def test_presence_only_unweighted_unsmoothed():
    loss = Cov3dLoss(severity_factor=0.0, presence_smoothing=0.0)
    logits, target = batch()
    expected = sum(bce(x, c) for x, _, c, _ in ROWS) / len(ROWS)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # lambda = 0 needs only the presence logit.
    assert loss(logits[:, :1], target).item() == pytest.approx(expected, rel=1e-6)
    assert loss.outputs == 1


@pytest.mark.parametrize("averaging", ["batch", "weighted"])
def test_presence_only_smoothed_weighted(averaging):
    loss = Cov3dLoss(
        severity_factor=0.0, presence_smoothing=0.1, presence_weights=PRESENCE_W, presence_averaging=averaging
    )
    logits, target = batch()
    assert loss(logits, target).item() == pytest.approx(expected_presence(0.1, PRESENCE_W, averaging), rel=1e-6)


def test_presence_averaging_default_is_the_batch_size():
    assert Cov3dLoss().presence_averaging == "batch"


@pytest.mark.parametrize("averaging, divisor", [("batch", 2), ("weighted", 4)])
def test_presence_two_rows_by_hand(averaging, divisor):
    # x = 2 positive (w = 3), x = -1 negative (w = 1), no smoothing:
    # (3 * log(1 + e^-2) + 1 * log(1 + e^-1)) / B with B = 2, or / (3 + 1) averaged over the weights
    loss = Cov3dLoss(
        severity_factor=0.0, presence_smoothing=0.0, presence_weights=[1.0, 3.0], presence_averaging=averaging
    )
    got = loss(torch.tensor([[2.0], [-1.0]]), torch.tensor([[1, 0], [0, 0]]))
    expected = (3 * math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / divisor
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_class_weights_count_in_a_same_class_batch_only_with_batch_averaging():
    # Two positives with the same logit x = 0.3, eps_p = 0.1, the Table 1 weights (w+ = 1992 / 1764):
    # averaged over the batch size the weight stays, w+ * l; averaged over the weights it cancels, l.
    weights = [1992 / 2220, 1992 / 1764]
    single = -(0.9 * math.log(1 / (1 + math.exp(-0.3))) + 0.1 * math.log(1 - 1 / (1 + math.exp(-0.3))))
    logits, target = torch.tensor([[0.3], [0.3]]), torch.tensor([[1, 0], [1, 0]])
    original = Cov3dLoss(severity_factor=0.0, presence_weights=weights, presence_averaging="batch")
    weighted = Cov3dLoss(severity_factor=0.0, presence_weights=weights, presence_averaging="weighted")
    assert original(logits, target).item() == pytest.approx(1992 / 1764 * single, rel=1e-6)
    assert weighted(logits, target).item() == pytest.approx(single, rel=1e-6)


def test_severity_is_averaged_over_its_weights_whatever_the_presence_averaging():
    # negative row (group weight 0.5) and critical row (group weight 3.0), one-hot targets:
    # (0.5 * CE(z_a, 0) + 3 * CE(z_b, 4)) / (0.5 + 3) for both settings
    z_a, z_b = [1.0, 0.2, -0.5, 0.3, 0.0], [0.0, -0.4, 0.2, 0.9, 1.5]
    expected = (0.5 * cross_entropy(z_a, ONE_HOT[0]) + 3.0 * cross_entropy(z_b, ONE_HOT[4])) / 3.5
    logits = torch.tensor([[0.0, *z_a], [0.0, *z_b]])
    target = torch.tensor([[0, 0], [1, 4]])
    for averaging in ("batch", "weighted"):
        loss = Cov3dLoss(severity_factor=1.0, severity_smoothing=0.0, severity_weights=SEVERITY_W,
                         presence_averaging=averaging)
        assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("eps_s", [0.0, 0.1])
def test_severity_only_weighted(eps_s):
    loss = Cov3dLoss(severity_factor=1.0, severity_smoothing=eps_s, severity_weights=SEVERITY_W)
    logits, target = batch()
    targets = SMOOTHED_01 if eps_s else ONE_HOT
    assert loss(logits, target).item() == pytest.approx(expected_severity(targets, SEVERITY_W), rel=1e-6)
    assert loss.outputs == 6


def test_severity_only_ignores_presence_logit():
    loss = Cov3dLoss(severity_factor=1.0)
    logits, target = batch()
    logits[:, 0] = float("nan")
    assert math.isfinite(loss(logits, target).item())


def test_unannotated_row_by_hand_and_unsmoothed():
    # z = (0.5, 1, -1, 0, 0.2): -log(sum_{c>=1} e^z_c / sum_c e^z_c)
    z = [0.5, 1.0, -1.0, 0.0, 0.2]
    exps = [math.exp(v) for v in z]
    expected = -math.log(sum(exps[1:]) / sum(exps))
    logits = torch.tensor([[0.0, *z]])
    target = torch.tensor([[1, 0]])
    for eps_s in (0.0, 0.1, 0.3):
        loss = Cov3dLoss(severity_factor=1.0, severity_smoothing=eps_s)
        assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_annotated_rows_by_hand():
    # moderate (class 2) with eps_s = 0.1: -(0.05 log s_1 + 0.9 log s_2 + 0.05 log s_3)
    z = [0.3, 0.3, 1.2, -0.8, 0.1]
    e = [math.exp(v) for v in z]
    s = [v / sum(e) for v in e]
    expected = -(0.05 * math.log(s[1]) + 0.9 * math.log(s[2]) + 0.05 * math.log(s[3]))
    loss = Cov3dLoss(severity_factor=1.0, severity_smoothing=0.1)
    assert loss(torch.tensor([[0.0, *z]]), torch.tensor([[1, 2]])).item() == pytest.approx(expected, rel=1e-6)
    # negative (class 0): -(0.9 log s_0 + 0.1 log s_1)
    expected_negative = -(0.9 * math.log(s[0]) + 0.1 * math.log(s[1]))
    got = loss(torch.tensor([[0.0, *z]]), torch.tensor([[0, 0]]))
    assert got.item() == pytest.approx(expected_negative, rel=1e-6)


@pytest.mark.parametrize("averaging", ["batch", "weighted"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_combined(lam, averaging):
    loss = Cov3dLoss(
        severity_factor=lam,
        presence_smoothing=0.1,
        severity_smoothing=0.1,
        presence_weights=PRESENCE_W,
        severity_weights=SEVERITY_W,
        presence_averaging=averaging,
    )
    logits, target = batch()
    expected = (1 - lam) * expected_presence(0.1, PRESENCE_W, averaging) + lam * expected_severity(SMOOTHED_01, SEVERITY_W)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # float targets (as a DataLoader may deliver them) give the same value
    assert loss(logits, target.float()).item() == pytest.approx(expected, rel=1e-6)


def test_extreme_logits_are_stable():
    loss = Cov3dLoss(severity_factor=0.0, presence_smoothing=0.0)
    got = loss(torch.tensor([[-200.0]]), torch.tensor([[1, 0]]))
    assert got.item() == pytest.approx(200.0, rel=1e-6)  # -log sigmoid(-200) = 200 + log(1 + e^-200)
    loss = Cov3dLoss(severity_factor=1.0)
    z = [0.0, -200.0, -200.0, -200.0, -200.0]
    got = loss(torch.tensor([[0.0, *z]]), torch.tensor([[1, 0]]))
    assert got.item() == pytest.approx(200.0 - math.log(4.0), rel=1e-6)  # -log(4 e^-200 / (1 + 4 e^-200))


def test_zero_weight_batch_gives_zero():
    loss = Cov3dLoss(severity_factor=0.0, presence_weights=[0.0, 1.0])
    assert loss(torch.tensor([[0.3], [1.0]]), torch.tensor([[0, 0], [0, 0]])).item() == 0.0


def test_gradient_flows_and_matches_hand_derivative():
    # d/dx of (1 - lambda) * BCE(sigmoid(x), y) for one row is (1 - lambda) * (p - y).
    lam, x, eps_p = 0.5, 0.8, 0.1
    logits = torch.tensor([[x, 0.1, 0.2, -0.3, 0.4, 0.0]], requires_grad=True)
    loss = Cov3dLoss(severity_factor=lam, presence_smoothing=eps_p)
    loss(logits, torch.tensor([[1, 3]])).backward()
    assert logits.grad[0, 0].item() == pytest.approx((1 - lam) * (sigmoid(x) - (1 - eps_p)), rel=1e-5)
    assert torch.all(logits.grad[0, 1:] != 0)

    # lambda = 0: the severity logits get no gradient
    logits = torch.tensor([[x, 0.1, 0.2, -0.3, 0.4, 0.0]], requires_grad=True)
    Cov3dLoss(severity_factor=0.0)(logits, torch.tensor([[1, 3]])).backward()
    assert torch.all(logits.grad[0, 1:] == 0) and logits.grad[0, 0] != 0


def test_bf16_logits():
    logits, target = batch()
    loss = Cov3dLoss(severity_factor=0.5)
    got = loss(logits.bfloat16(), target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss(logits.bfloat16().float(), target).item(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"severity_factor": -0.1},
        {"severity_factor": 1.5},
        {"presence_smoothing": 1.0},
        {"severity_smoothing": -0.01},
        {"presence_weights": [1.0, 2.0, 3.0]},
        {"severity_weights": [1.0] * 5},
        {"presence_weights": [1.0, -1.0]},
        {"presence_averaging": "mean"},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        Cov3dLoss(**kwargs)


def test_invalid_shapes():
    loss = Cov3dLoss(severity_factor=0.5)
    with pytest.raises(ValueError, match="logits"):
        loss(torch.zeros(2, 1), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        loss(torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))


def test_class_weights_by_hand():
    # Table 1 training counts: 1,110 negative, 882 positive; total 1,992, two classes present.
    assert class_weights([1110, 882]) == pytest.approx([1992 / 2220, 1992 / 1764])
    assert class_weights([1110, 882]) == pytest.approx([0.8972973, 1.1292517], rel=1e-6)
    # absent class gets 0; total 4 over 2 present classes -> 4 / (2 * 3), 0, 4 / (2 * 1)
    assert class_weights([3, 0, 1]) == pytest.approx([2 / 3, 0.0, 2.0])
    assert class_weights([5, 5, 5]) == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        class_weights([0, 0])
    with pytest.raises(ValueError):
        class_weights([3, -1])
