"""Predictors: a run's or model file's models -> probabilities per scan, with reflection test-time
augmentation (paper §3.5), Monte-Carlo dropout and each model's temperatures (``cov3d.model.calibration``);
``combine`` averages the (N, B, 5) predictions of N models or samples into a ``Prediction`` per scan.

Decisions (covid or not, the severity) are the paper's: made on the mean of the uncalibrated
probabilities. The probabilities reported are the mean of the calibrated ones. For one model without
Monte-Carlo dropout both give the same decision (a temperature keeps the sign of the logit and the
argmax); in an ensemble whose members have different temperatures, or under Monte-Carlo dropout, the
mean of the calibrated probabilities of a scan near the boundary can lie on the other side of it.

Training scores its kept weights with them (``cov3d.training.evaluation``) exactly as ``cov3d
infer`` predicts (``cov3d.inference``), so they live below both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.errors import Cov3dError
from cov3d.logits import has_severity, presence_output
from cov3d.model.calibration import covid_logits_from_severity, pool_views, task_logits, task_probabilities
from cov3d.model.files import ModelSource
from cov3d.model.metrics import PRESENCE_THRESHOLD
from cov3d.recipes import MEAN_LOGIT
from cov3d.runfiles import TASKS
from cov3d.runtime import autocast
from cov3d.window import MODEL_WINDOW, ModelWindow, Window

DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class Prediction:
    """Probabilities for one scan: P(covid) and P(severity | covid) over mild..critical (or None),
    with the spread of P(covid) and the severity agreement over models and Monte-Carlo samples."""

    covid_probability: float
    severity_probabilities: list[float] | None
    covid_probability_std: float = 0.0
    severity_agreement: float | None = None
    decision_covid_probability: float | None = None
    """The uncalibrated P(covid) that decides ``covid`` (None: ``covid_probability`` decides)."""
    decision_severity_probabilities: list[float] | None = None
    """The uncalibrated P(severity | covid) that decides ``severity`` (None: ``severity_probabilities``)."""

    @property
    def covid(self) -> bool:
        decided = self.covid_probability if self.decision_covid_probability is None else self.decision_covid_probability
        return decided >= PRESENCE_THRESHOLD

    @property
    def finite(self) -> bool:
        """Whether every model gave finite outputs for the scan (else it is no prediction at all)."""
        return math.isfinite(self.covid_probability)

    @property
    def severity(self) -> str:
        decided = self.decision_severity_probabilities or self.severity_probabilities
        if decided is None:
            return ""
        return SEVERITY_LABELS[max(range(len(SEVERITY_LABELS)), key=decided.__getitem__)]


class Samples(NamedTuple):
    """A member's (S, B, 5) predictions of one pass: uncalibrated (they decide) and calibrated (reported)."""

    raw: torch.Tensor
    calibrated: torch.Tensor


def enable_mc_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Monte-Carlo dropout: dropout layers sample (train mode), everything else (batch norm) stays in eval mode."""
    model.eval()
    for module in model.modules():
        if isinstance(module, DROPOUT_LAYERS):
            module.train()
    return model


class RunPredictor:
    """The models of one run or model file: presence from the best-presence weights, severity from the
    best-severity ones; ``tasks`` limits it to one of the two (e.g. a presence member of an ensemble
    whose severity comes from other runs).

    DICOM and NIfTI scans are mapped to grey levels with the model's window (``ModelSource.window``)
    unless ``window`` overrides it (``shape``: the inputs it expects, window included). ``calibrated``:
    apply the temperatures the model records (``ModelSource.temperature``); off, or for a task without
    one, the probabilities are uncalibrated."""

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype | None, mc_samples: int = 0, reflect: bool = True,
        tasks: Sequence[str] = TASKS, window: Window | ModelWindow = MODEL_WINDOW, calibrated: bool = True,
    ):
        if "presence" in tasks and "presence" not in source.tasks:
            raise Cov3dError(
                f"{source.path} cannot predict COVID-19 presence: trained with lambda = 1 and the graded-only severity "
                "loss, it has neither a trained presence output nor a 'negative' class. Give it for severity only "
                "(--severity-model) with another model for presence."
            )
        self.source, self.device, self.dtype, self.reflect = source, device, dtype, reflect
        self.mean_logit = source.config.get("presence_decision") == MEAN_LOGIT
        self.temperatures = {task: source.temperature(task) for task in TASKS} if calibrated else {}
        self.shape = source.shape.with_window(window)
        self.samples_per_scan = max(1, mc_samples)
        self.tasks = tuple(tasks)
        wants_presence = "presence" in self.tasks
        self.presence_model = self._load("presence", mc_samples > 0) if wants_presence else None
        # Severity weights also give P(covid) = sum of s_1..s_4 when a run has no presence weights (lambda = 1).
        needs_severity = "severity" in self.tasks or (wants_presence and self.presence_model is None)
        self.severity_model = self._load("severity", mc_samples > 0) if needs_severity else None

    def _load(self, task: str, mc_dropout: bool) -> torch.nn.Module | None:
        model = self.source.build(task)
        if model is None:
            return None
        return (enable_mc_dropout(model) if mc_dropout else model).to(self.device)

    def _pooled(self, model: torch.nn.Module, volumes: torch.Tensor) -> torch.Tensor:
        """(B, outputs) logits pooled over the scan and its sagittal reflection (unless ``reflect`` is off):
        ``cov3d.model.calibration.pool_views``, whose sigmoid / softmax are the mean probabilities (for a run
        with ``presence_decision="mean-logit"``, the original code's, x is the mean logit instead)."""
        views = []
        for view in (volumes, volumes.flip(-1)) if self.reflect else (volumes,):
            with torch.no_grad(), autocast(self.device, self.dtype):
                views.append(model(view).float())
        return pool_views(torch.stack(views), mean_logit=self.mean_logit)

    def task_logits(self, volumes: torch.Tensor) -> torch.Tensor:
        """Volumes (B, 1, D, H, W) -> (B, 5) task logits [l, g_1..g_4] (``cov3d.model.calibration``), NaN
        for a task this member does not predict (severity also without severity weights); non-finite
        logits where the model's outputs were not finite."""
        batch = volumes.shape[0]
        presence = self._pooled(self.presence_model, volumes) if self.presence_model else None
        severity = self._pooled(self.severity_model, volumes) if self.severity_model else None
        if "presence" not in self.tasks:
            covid = torch.full((batch,), math.nan, device=volumes.device)
        elif presence is not None:
            covid = presence_output(presence)
        else:  # lambda = 1: P(covid) = s_1 + .. + s_4 (paper, after eq. 3; ``ModelSource.tasks``)
            covid = covid_logits_from_severity(severity)
        graded = "severity" in self.tasks and severity is not None and has_severity(severity.shape[1])
        logits = task_logits(covid, severity if graded else None)
        finite = torch.ones(batch, dtype=torch.bool, device=covid.device)
        for pooled in (presence, severity):
            if pooled is not None:
                finite &= torch.isfinite(pooled).all(dim=1)
        return torch.where(finite[:, None], logits, math.inf).cpu()

    def _sample(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two predictions (B, 5) [P(covid), P(mild..critical | covid)] from one pass: uncalibrated and
        with the member's temperatures; NaN for a task this member does not predict, P(covid) infinite
        for a scan whose model outputs were not finite, which ``combine`` keeps (``Prediction.finite``)."""
        logits = self.task_logits(volumes)
        failed = torch.isinf(logits[:, 0])
        marked = []
        for temperatures in ({}, self.temperatures):
            probabilities = task_probabilities(logits, temperatures)
            probabilities[:, 0] = torch.where(failed, math.inf, probabilities[:, 0])
            marked.append(probabilities)
        return marked[0], marked[1]

    def samples(self, volumes: torch.Tensor) -> Samples:
        """Volumes (B, 1, D, H, W) -> (S, B, 5) predictions, uncalibrated and calibrated, S = the
        Monte-Carlo samples (1 without)."""
        volumes = volumes.to(self.device)
        drawn = [self._sample(volumes) for _ in range(self.samples_per_scan)]
        return Samples(torch.stack([raw for raw, _ in drawn]), torch.stack([scaled for _, scaled in drawn]))

    def predict(self, volumes: torch.Tensor) -> list[Prediction]:
        """Volumes (B, 1, D, H, W) -> one Prediction per scan."""
        return combine(*self.samples(volumes))

    @property
    def predicted_tasks(self) -> list[str]:
        """The tasks this member predicts: presence (from the severity weights for a lambda = 1 run), and
        severity where it has severity weights with severity outputs."""
        predicted = ["presence"] if "presence" in self.tasks else []
        if "severity" in self.tasks and self.severity_model is not None and has_severity(self.source.config["outputs"]):
            predicted.append("severity")
        return predicted

    @property
    def uncalibrated_tasks(self) -> list[str]:
        """The tasks this member predicts without a temperature (all of them with ``calibrated`` off)."""
        return [task for task in self.predicted_tasks if self.temperatures.get(task) is None]


def _mean(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, B, 5) -> the means over the N that predict each task: P(covid) (B,), P(severity | covid) (B, 4),
    and which of the (N, B) predict severity."""
    return torch.nanmean(samples[..., 0], dim=0), torch.nanmean(samples[..., 1:], dim=0), ~torch.isnan(samples[..., 1])


def combine(samples: torch.Tensor, calibrated: torch.Tensor | None = None) -> list[Prediction]:
    """Predictions (N, B, 5) of N models or Monte-Carlo samples -> one Prediction per scan.

    P(covid) and P(severity | covid) are the means over the N that predict them (NaN marks a task a
    model does not predict; an infinite P(covid), a failed scan, stays infinite); the spread is the
    standard deviation of P(covid) over those N, and the agreement the share of the N with a severity
    whose most likely severity is the final one. With ``calibrated`` (N, B, 5), the same predictions at
    the members' temperatures, the probabilities and spread reported are theirs, while the decisions
    stay those of ``samples`` (the module docstring).
    """
    decided_covid, decided_severity, has_severity = _mean(samples)
    reported = samples if calibrated is None else calibrated
    mean_covid, mean_severity, _ = _mean(reported)
    spread = torch.nanmean((reported[..., 0] - mean_covid) ** 2, dim=0).sqrt()
    votes = torch.nan_to_num(samples[..., 1:], nan=-1.0).argmax(dim=-1)
    agreement = ((votes == decided_severity.argmax(dim=-1)) & has_severity).sum(0) / has_severity.sum(0).clamp(min=1)
    predictions = []
    for i in range(samples.shape[1]):
        known = bool(has_severity[:, i].any())
        predictions.append(Prediction(
            float(mean_covid[i]),
            mean_severity[i].tolist() if known else None,
            float(spread[i]),
            float(agreement[i]) if known else None,
            None if calibrated is None else float(decided_covid[i]),
            decided_severity[i].tolist() if known and calibrated is not None else None,
        ))
    return predictions
