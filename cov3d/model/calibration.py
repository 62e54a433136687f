"""Temperature scaling of the two tasks (one temperature T > 0 per task), and the scores that say how
well probabilities are calibrated: the expected calibration error (ECE), the Brier score and the NLL.

Each task's probabilities are a softmax of its *task logits* (``pool_views``, ``task_logits``):

- presence: one logit per scan, l = logit(P(covid)), P(covid) the mean over the scan's views (it and
  its sagittal reflection) of sigmoid(x); for a lambda = 1 run, which has no presence weights, P(covid)
  = s_1 + .. + s_4 of the mean softmax(z) (the paper's rule after eq. 3);
- severity: four logits per scan, g_k = log of the mean over the views of s_k (k = 1..4, mild..critical),
  so that P(grade | covid) = softmax(g), the mild..critical probabilities ``cov3d infer`` reports.

Calibrated, they are sigmoid(l / T) and softmax(g / T); for one view these are sigmoid(x / T) and
softmax(z_1..z_4 / T), textbook temperature scaling. A T > 0 keeps the sign of l and the argmax of g,
so one model's decisions never move. T is fitted on the validation scans by minimising the NLL over
log T (``fit_temperature``): a grid, then a bounded Brent search around its best point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cov3d.logits import GRADES, PRESENCE_COLUMN, SEVERITY_COLUMNS, grade_outputs
from cov3d.model.metrics import PRESENCE_THRESHOLD

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The fitted T lies here: a T on a bound means the validation scans could not pin it down (e.g. every
scan right, so the NLL falls all the way as T -> 0)."""
GRID_POINTS = 81
"""Log-spaced temperatures tried before the Brent search refines the best one."""
CALIBRATION_BINS = 10
"""Equal-width bins of confidence over [0, 1] for the ECE and the reliability diagram (right-open, the
last one closed: a confidence of 1 falls in [0.9, 1])."""
TASK_CLASSES = {"presence": 2, "severity": 4}
"""Classes of each calibrated task: covid / non-covid; mild..critical."""


def pool_views(view_logits: torch.Tensor, mean_logit: bool = False) -> torch.Tensor:
    """Logits (V, B, outputs) of V views of each scan -> (B, outputs): column 0 = logit of the mean of
    sigmoid(x) over the views (``mean_logit``: the mean of x, the original code's rule), the other
    columns = log of the mean of softmax(z) over the views (computed in the log domain, finite for any
    finite logits; for V = 1 the logits themselves, up to a constant on z)."""
    views = view_logits.float()
    x = views[..., PRESENCE_COLUMN]  # (V, B)
    if mean_logit:
        parts = [x.mean(dim=0)[:, None]]
    else:
        parts = [(torch.logsumexp(F.logsigmoid(x), dim=0) - torch.logsumexp(F.logsigmoid(-x), dim=0))[:, None]]
    if views.shape[-1] > 1:
        log_s = torch.log_softmax(views[..., SEVERITY_COLUMNS], dim=-1)
        parts.append(torch.logsumexp(log_s, dim=0) - math.log(views.shape[0]))
    return torch.cat(parts, dim=1)


def covid_logits_from_severity(pooled: torch.Tensor) -> torch.Tensor:
    """(B, 6) pooled logits -> (B,): logit of P(covid) = s_1 + .. + s_4 (lambda = 1 runs)."""
    severity = pooled[:, SEVERITY_COLUMNS]
    return torch.logsumexp(severity[:, GRADES], dim=1) - severity[:, 0]


def task_logits(covid_logit: torch.Tensor, pooled_severity: torch.Tensor | None) -> torch.Tensor:
    """(B,) presence logits l and (B, 6) pooled severity logits (or None) -> (B, 5) [l, g_1..g_4] (NaN: none)."""
    grades = (grade_outputs(pooled_severity) if pooled_severity is not None
              else torch.full((covid_logit.shape[0], TASK_CLASSES["severity"]), math.nan, device=covid_logit.device))
    return torch.cat([covid_logit[:, None], grades], dim=1)


def task_probabilities(logits: torch.Tensor, temperatures: dict[str, float | None]) -> torch.Tensor:
    """(B, 5) task logits [l, g_1..g_4] -> (B, 5) [P(covid), P(mild..critical | covid)], with each task's
    temperature (a task absent or None: T = 1, uncalibrated). NaN logits give NaN probabilities."""
    presence = temperatures.get("presence") or 1.0
    severity = temperatures.get("severity") or 1.0
    covid = torch.sigmoid(logits[:, :1] / presence)
    return torch.cat([covid, torch.softmax(logits[:, 1:] / severity, dim=1)], dim=1)


def scaled_probabilities(task: str, logits: np.ndarray, temperature: float) -> np.ndarray:
    """One task's probabilities at ``temperature``: (N,) presence logits -> (N,) P(covid); (N, 4) grade
    logits -> (N, 4) P(grade | covid). Float64."""
    scaled = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return (torch.sigmoid(scaled) if task == "presence" else torch.softmax(scaled, dim=1)).numpy()


def negative_log_likelihood(task: str, logits: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``truth`` (presence: (N,) 0/1; severity: (N,) 0..3 = mild..critical) under the task's
    probabilities at ``temperature`` (computed in the log domain)."""
    scaled = torch.as_tensor(logits, dtype=torch.float64) / temperature
    target = torch.as_tensor(truth)
    if task == "presence":
        return float(F.binary_cross_entropy_with_logits(scaled, target.double()))
    return float(F.cross_entropy(scaled, target.long()))


def fit_temperature(task: str, logits: np.ndarray, truth: np.ndarray) -> float:
    """The T in ``TEMPERATURE_BOUNDS`` that minimises ``negative_log_likelihood`` over the scans given:
    the best of ``GRID_POINTS`` log-spaced values, refined by a bounded Brent search between its neighbours."""
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        return negative_log_likelihood(task, logits, truth, math.exp(log_t))

    grid = np.linspace(math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]), GRID_POINTS)
    values = [loss(log_t) for log_t in grid]
    best = int(np.argmin(values))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)]
    refined = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    log_t = float(refined.x) if refined.fun <= values[best] else float(grid[best])
    return math.exp(log_t)


def top_label(task: str, probabilities: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) confidence (the probability of the predicted class) and (N,) bool correctness of the decision:
    presence P(covid) >= 0.5 (confidence max(p, 1 - p)); severity the argmax of the four grades."""
    if task == "presence":
        decided = probabilities >= PRESENCE_THRESHOLD
        return np.where(decided, probabilities, 1.0 - probabilities), decided == (truth == 1)
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == truth


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS):
    """Per equal-width confidence bin: (counts, mean confidence, accuracy), each (bins,); NaN for an empty bin."""
    index = np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct.astype(float), minlength=bins) / counts
    return counts, mean_confidence, accuracy


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE = sum over bins of (n_b / N) |accuracy_b - mean confidence_b| (``reliability_bins``)."""
    counts, mean_confidence, accuracy = reliability_bins(confidence, correct, bins)
    filled = counts > 0
    return float((counts[filled] * np.abs(accuracy[filled] - mean_confidence[filled])).sum() / counts.sum())


def brier_score(task: str, probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared error of the probabilities against the one-hot truth: presence (p - y)^2; severity
    sum over the four grades of (p_k - [k = truth])^2 (so between 0 and 2)."""
    if task == "presence":
        return float(np.mean((probabilities - truth) ** 2))
    one_hot = np.eye(probabilities.shape[1])[truth]
    return float(np.mean(((probabilities - one_hot) ** 2).sum(axis=1)))


@dataclass
class TaskCalibration:
    """A task's fitted temperature and its scores on the validation scans before (T = 1) and after."""

    task: str
    temperature: float
    scans: int
    scores: dict[str, float] = field(default_factory=dict)
    """ece_before, ece_after, brier_before, brier_after, nll_before, nll_after."""
    bins: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    """"before" / "after": ``reliability_bins`` of the top-label confidence."""

    def summary(self) -> dict:
        """What summary.json records for the task."""
        return {"temperature": self.temperature, "scans": self.scans, **self.scores}


def calibrate_task(task: str, logits: np.ndarray, truth: np.ndarray) -> TaskCalibration | None:
    """Fit the task's temperature on ``logits`` (presence (N,), severity (N, 4)) and ``truth`` (presence
    0/1, severity 0..3) and score it before and after; rows with a non-finite logit are left out. None
    when no scan is left."""
    logits, truth = np.asarray(logits, dtype=np.float64), np.asarray(truth).astype(int)
    finite = np.isfinite(logits.reshape(len(logits), -1)).all(axis=1)
    logits, truth = logits[finite], truth[finite]
    if not len(truth):
        return None
    temperature = fit_temperature(task, logits, truth)
    result = TaskCalibration(task, temperature, len(truth))
    for when, t in (("before", 1.0), ("after", temperature)):
        probabilities = scaled_probabilities(task, logits, t)
        confidence, correct = top_label(task, probabilities, truth)
        result.scores[f"ece_{when}"] = expected_calibration_error(confidence, correct)
        result.scores[f"brier_{when}"] = brier_score(task, probabilities, truth)
        result.scores[f"nll_{when}"] = negative_log_likelihood(task, logits, truth, t)
        result.bins[when] = reliability_bins(confidence, correct)
    return result
