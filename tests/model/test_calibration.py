"""Temperature scaling: the fit against known optima and a brute-force search, ECE and Brier against
values worked out by hand, pooled views against plain probabilities, and decisions that never move."""

import math

import numpy as np
import pytest
import torch

from cov3d.model.calibration import (
    TEMPERATURE_BOUNDS,
    brier_score,
    calibrate_task,
    covid_logits_from_severity,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    pool_views,
    reliability_bins,
    scaled_probabilities,
    task_probabilities,
    top_label,
)
from cov3d.model.metrics import macro_f1
from cov3d.model.predictor import combine


def test_presence_fit_finds_the_known_optimum():
    """Logits +-2, right 3 times in 4 on each side: the NLL is least where sigmoid(2 / T) = 3/4, T = 2 / ln 3."""
    logits = np.array([2.0, 2, 2, 2, -2, -2, -2, -2])
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    assert fit_temperature("presence", logits, truth) == pytest.approx(2 / math.log(3), rel=1e-5)


def test_severity_fit_finds_the_known_optimum():
    """Logits (3, 0, 0, 0) up to the class order, right 3 times in 4: softmax's top value must be 3/4,
    e^(3/T) / (e^(3/T) + 3) = 3/4, so e^(3/T) = 9 and T = 3 / ln 9."""
    logits = np.array([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 3.0], [0, 0, 3.0, 0]])
    truth = np.array([0, 1, 3, 1])  # the last one wrong
    assert fit_temperature("severity", logits, truth) == pytest.approx(3 / math.log(9), rel=1e-5)


@pytest.mark.parametrize("task", ["presence", "severity"])
def test_fit_matches_a_brute_force_search(task):
    """NLL written out with numpy (log-sum-exp by hand) on a fine grid of T: the fit is as good and as near."""
    rng = np.random.default_rng(1 if task == "presence" else 2)
    if task == "presence":
        logits = rng.normal(0, 4, 60)
        truth = (rng.random(60) < 1 / (1 + np.exp(-logits / 2.5))).astype(int)  # overconfident by 2.5

        def nll(t):
            return np.mean(np.logaddexp(0, -logits / t) * truth + np.logaddexp(0, logits / t) * (1 - truth))
    else:
        logits = rng.normal(0, 3, (60, 4))
        truth = rng.integers(0, 4, 60)
        truth[:40] = logits[:40].argmax(axis=1)  # right about 2 times in 3

        def nll(t):
            scaled = logits / t
            top = scaled.max(axis=1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
            return np.mean(log_z - scaled[np.arange(60), truth])

    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 20001))
    values = np.array([nll(t) for t in grid])
    fitted = fit_temperature(task, logits, truth)
    assert fitted == pytest.approx(grid[values.argmin()], rel=1e-3)
    assert nll(fitted) <= values.min() + 1e-9
    assert negative_log_likelihood(task, logits, truth, fitted) == pytest.approx(nll(fitted), rel=1e-9)
    assert fitted != pytest.approx(1.0, abs=0.05)  # the case is not the trivial one


def test_a_perfect_validation_set_pushes_t_to_its_lower_bound():
    assert fit_temperature("presence", np.array([1.0, -1.0]), np.array([1, 0])) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-4)


def test_ece_and_brier_by_hand():
    # presence: decisions 1 1 0 1 0, right: yes no yes yes yes; confidences .92 .83 .65 .56 .96
    p = np.array([0.92, 0.83, 0.35, 0.56, 0.04])
    y = np.array([1, 0, 0, 1, 0])
    confidence, correct = top_label("presence", p, y)
    assert confidence == pytest.approx([0.92, 0.83, 0.65, 0.56, 0.96])
    assert correct.tolist() == [True, False, True, True, True]
    # bins: [.9, 1] holds .92 and .96 (mean .94, accuracy 1), [.8, .9) .83 (0), [.6, .7) .65 (1), [.5, .6) .56 (1)
    counts, mean_confidence, accuracy = reliability_bins(confidence, correct)
    assert counts.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 1, 2]
    assert mean_confidence[9] == pytest.approx(0.94) and accuracy[8] == 0 and np.isnan(accuracy[0])
    assert expected_calibration_error(confidence, correct) == pytest.approx((2 * 0.06 + 0.83 + 0.35 + 0.44) / 5)
    assert brier_score("presence", p, y) == pytest.approx((0.08**2 + 0.83**2 + 0.35**2 + 0.44**2 + 0.04**2) / 5)

    # severity: right (conf .64), wrong (.45), right (.85)
    s = np.array([[0.64, 0.16, 0.1, 0.1], [0.2, 0.45, 0.25, 0.1], [0.05, 0.05, 0.05, 0.85]])
    g = np.array([0, 2, 3])
    confidence, correct = top_label("severity", s, g)
    assert expected_calibration_error(confidence, correct) == pytest.approx((0.36 + 0.45 + 0.15) / 3)
    by_row = [0.36**2 + 0.16**2 + 0.1**2 + 0.1**2, 0.2**2 + 0.45**2 + 0.75**2 + 0.1**2, 3 * 0.05**2 + 0.15**2]
    assert brier_score("severity", s, g) == pytest.approx(sum(by_row) / 3)


def test_calibrate_task_scores_before_and_after():
    logits = np.array([2.0, 2, 2, 2, -2, -2, -2, -2, math.nan])  # the NaN row is left out
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1])
    result = calibrate_task("presence", logits, truth)
    assert result.scans == 8
    before = 1 / (1 + math.exp(-2))
    assert result.scores["ece_before"] == pytest.approx(before - 0.75)  # one bin, accuracy 3/4
    assert result.scores["ece_after"] == pytest.approx(0.0, abs=1e-6)  # calibrated to 3/4 exactly
    assert result.scores["brier_before"] == pytest.approx(0.75 * (1 - before) ** 2 + 0.25 * before**2)
    assert result.scores["brier_after"] == pytest.approx(0.75 * 0.25**2 + 0.25 * 0.75**2)
    assert result.scores["nll_after"] < result.scores["nll_before"]
    assert calibrate_task("severity", np.full((2, 4), math.nan), np.array([0, 1])) is None


def test_pooled_views_are_the_mean_probabilities():
    torch.manual_seed(0)
    views = torch.randn(2, 3, 6) * 4
    views[0, 0] = torch.tensor([200.0, -150, 0, 90, 10, -300])  # saturated logits stay finite
    pooled = pool_views(views)
    assert torch.isfinite(pooled).all()
    assert torch.sigmoid(pooled[:, 0]) == pytest.approx(torch.sigmoid(views[..., 0].double()).mean(0).float(), abs=1e-6)
    assert pooled[:, 1:].exp() == pytest.approx(torch.softmax(views[..., 1:].double(), -1).mean(0).float(), abs=1e-6)
    single = pool_views(views[:1])
    assert single[:, 0] == pytest.approx(views[0, :, 0], abs=1e-5)
    # lambda = 1: P(covid) = s_1 + .. + s_4 of the mean softmax
    assert torch.sigmoid(covid_logits_from_severity(pooled)) == pytest.approx(pooled[:, 2:].exp().sum(1), abs=1e-6)


def test_task_probabilities_scale_each_task_by_its_temperature():
    logits = torch.tensor([[1.5, 2.0, 0.5, -1.0, 0.0], [-0.4, math.nan, math.nan, math.nan, math.nan]])
    raw = task_probabilities(logits, {})
    scaled = task_probabilities(logits, {"presence": 2.0, "severity": 0.5})
    assert scaled[0, 0] == pytest.approx(1 / (1 + math.exp(-0.75)))
    grades = np.exp(np.array([2.0, 0.5, -1.0, 0.0]) / 0.5)
    assert scaled[0, 1:] == pytest.approx(torch.tensor(grades / grades.sum(), dtype=torch.float32))
    assert raw[1, 0] == pytest.approx(1 / (1 + math.exp(0.4))) and torch.isnan(scaled[1, 1:]).all()


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.7, 20.0])
def test_temperatures_never_move_a_decision_or_the_macro_f1(temperature):
    rng = np.random.default_rng(3)
    presence, truth = rng.normal(0, 3, 200), rng.integers(0, 2, 200)
    grades = rng.normal(0, 3, (200, 4))
    before = scaled_probabilities("presence", presence, 1.0) >= 0.5
    after = scaled_probabilities("presence", presence, temperature) >= 0.5
    assert (before == after).all() and (after == (presence >= 0)).all()
    assert macro_f1(truth, after.astype(int), [0, 1]) == macro_f1(truth, before.astype(int), [0, 1])
    severity_after = scaled_probabilities("severity", grades, temperature).argmax(axis=1)
    assert (severity_after == grades.argmax(axis=1)).all()


def _member(logits: torch.Tensor, temperatures: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, B, 5) raw and calibrated predictions of one model with task logits (B, 5)."""
    return task_probabilities(logits, {})[None], task_probabilities(logits, temperatures)[None]


def test_ensemble_decisions_are_made_on_the_uncalibrated_mean():
    """Member A: x = 1 (T = 1); member B: x = -3 (T = 10). Uncalibrated mean (0.731 + 0.047) / 2 = 0.389:
    not covid. Calibrated mean (0.731 + sigmoid(-0.3) = 0.426) / 2 = 0.578 would cross 0.5: the decision
    stays the paper's, the probability reported is the calibrated mean. Severity likewise: the argmax
    of the uncalibrated mean, probabilities the calibrated mean."""
    a_raw, a_cal = _member(torch.tensor([[1.0, math.log(9), 0.0, -20.0, -20.0]]), {"presence": 1.0, "severity": 1.0})
    b_raw, b_cal = _member(torch.tensor([[-3.0, -20.0, 0.0, -20.0, -20.0]]), {"presence": 10.0, "severity": 10.0})
    raw, calibrated = torch.cat([a_raw, b_raw]), torch.cat([a_cal, b_cal])
    (prediction,) = combine(raw, calibrated)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert prediction.covid_probability == pytest.approx((sigmoid(1) + sigmoid(-0.3)) / 2)
    assert prediction.covid_probability > 0.5 and not prediction.covid
    assert prediction.decision_covid_probability == pytest.approx((sigmoid(1) + sigmoid(-3)) / 2)
    # grades: A mild 0.9, moderate 0.1; B moderate ~1 raw, 1 / (1 + 3 e^-2) = 0.711 at T = 10 (0.096 the others).
    # Raw mean: moderate 0.55 > mild 0.45; calibrated mean: mild 0.498 > moderate 0.406. The decision: moderate.
    mild = (0.9 + 1 / (1 + 3 * math.exp(-2)) * math.exp(-2)) / 2
    assert prediction.severity_probabilities[0] == pytest.approx(mild, abs=1e-6)
    assert max(prediction.severity_probabilities) == prediction.severity_probabilities[0]
    assert prediction.severity == "moderate"
    assert prediction.severity_probabilities == pytest.approx(calibrated[:, 0, 1:].mean(0).tolist())
    assert prediction.decision_severity_probabilities == pytest.approx(raw[:, 0, 1:].mean(0).tolist())
    (uncalibrated,) = combine(raw)
    assert uncalibrated.covid == prediction.covid and uncalibrated.severity == prediction.severity
    assert uncalibrated.covid_probability == pytest.approx(prediction.decision_covid_probability)


def test_one_model_reports_probabilities_that_agree_with_its_decisions():
    torch.manual_seed(4)
    logits = torch.randn(50, 5) * 3
    raw, calibrated = _member(logits, {"presence": 3.0, "severity": 0.4})
    for prediction in combine(raw, calibrated):
        assert prediction.covid == (prediction.covid_probability >= 0.5)
        probabilities = prediction.severity_probabilities
        assert prediction.severity == ("mild", "moderate", "severe", "critical")[probabilities.index(max(probabilities))]
