"""Predictors: a run's or model file's models -> probabilities per scan, with reflection test-time
augmentation (paper §3.5) and Monte-Carlo dropout; ``combine`` averages the (N, B, 5) predictions of
N models or samples into a ``Prediction`` per scan.

Training scores its kept weights with them (``cov3d.training.evaluation``) exactly as ``cov3d
infer`` predicts (``cov3d.inference``), so they live below both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.logits import grade_outputs, has_negative_class, has_severity, presence_output, severity_outputs
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

    @property
    def covid(self) -> bool:
        return self.covid_probability >= PRESENCE_THRESHOLD

    @property
    def finite(self) -> bool:
        """Whether every model gave finite outputs for the scan (else it is no prediction at all)."""
        return math.isfinite(self.covid_probability)

    @property
    def severity(self) -> str:
        if self.severity_probabilities is None:
            return ""
        return SEVERITY_LABELS[max(range(len(SEVERITY_LABELS)), key=self.severity_probabilities.__getitem__)]


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
    unless ``window`` overrides it (``shape``: the inputs it expects, window included)."""

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype | None, mc_samples: int = 0, reflect: bool = True,
        tasks: Sequence[str] = TASKS, window: Window | ModelWindow = MODEL_WINDOW,
    ):
        self.source, self.device, self.dtype, self.reflect = source, device, dtype, reflect
        self.mean_logit = source.config.get("presence_decision") == MEAN_LOGIT
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

    def _probabilities(self, model: torch.nn.Module, volumes: torch.Tensor) -> torch.Tensor:
        """Mean over the scan and its sagittal reflection (unless ``reflect`` is off) of [sigmoid(x), softmax(z)]
        -> (B, 1, 5 or 6); for a run with ``presence_decision="mean-logit"`` (the original code), sigmoid of the
        mean x instead, so that P(covid) >= 0.5 exactly when the mean logit is >= 0."""
        outputs = []
        for view in (volumes, volumes.flip(-1)) if self.reflect else (volumes,):
            with torch.no_grad(), autocast(self.device, self.dtype):
                logits = model(view).float()
            parts = [presence_output(logits)[:, None]]
            if has_severity(logits.shape[1]):
                parts.append(torch.softmax(severity_outputs(logits), dim=1))
            outputs.append(torch.cat(parts, dim=1))
        stacked = torch.stack(outputs)
        if self.mean_logit:
            mean = stacked.mean(dim=0)
            return torch.cat([torch.sigmoid(mean[:, :1]), mean[:, 1:]], dim=1)
        return torch.cat([torch.sigmoid(stacked[..., :1]), stacked[..., 1:]], dim=2).mean(dim=0)

    def _sample(self, volumes: torch.Tensor) -> torch.Tensor:
        """One prediction (B, 5): [P(covid), P(mild..critical | covid)], NaN for a task this member does
        not predict (severity also without severity weights); P(covid) infinite for a scan whose model
        outputs were not finite, which ``combine`` keeps (``Prediction.finite``)."""
        batch = volumes.shape[0]
        presence_probabilities = self._probabilities(self.presence_model, volumes) if self.presence_model else None
        severity_probabilities = self._probabilities(self.severity_model, volumes) if self.severity_model else None
        if "presence" not in self.tasks:
            covid = torch.full((batch,), math.nan, device=volumes.device)
        elif presence_probabilities is not None:
            covid = presence_output(presence_probabilities)
        elif has_negative_class(severity_probabilities.shape[1]):  # lambda = 1: P(covid) = s_1 + .. + s_4 (after eq. 3)
            covid = grade_outputs(severity_probabilities).sum(dim=1)
        else:  # no z_0 (graded-only severity loss): the presence output of the severity weights
            covid = presence_output(severity_probabilities)
        if "severity" in self.tasks and severity_probabilities is not None and has_severity(severity_probabilities.shape[1]):
            graded = grade_outputs(severity_probabilities)
            given_covid = graded / graded.sum(dim=1, keepdim=True)
        else:
            given_covid = torch.full((batch, len(SEVERITY_LABELS)), math.nan)
        finite = torch.ones(batch, dtype=torch.bool, device=covid.device)
        for outputs in (presence_probabilities, severity_probabilities):
            if outputs is not None:
                finite &= torch.isfinite(outputs).all(dim=1)
        covid = torch.where(finite, covid, math.inf)  # never infinite otherwise: the scan failed
        return torch.cat([covid[:, None], given_covid.to(covid.device)], dim=1).cpu()

    def samples(self, volumes: torch.Tensor) -> torch.Tensor:
        """Volumes (B, 1, D, H, W) -> (S, B, 5) predictions, S = the Monte-Carlo samples (1 without)."""
        volumes = volumes.to(self.device)
        return torch.stack([self._sample(volumes) for _ in range(self.samples_per_scan)])

    def predict(self, volumes: torch.Tensor) -> list[Prediction]:
        """Volumes (B, 1, D, H, W) -> one Prediction per scan."""
        return combine(self.samples(volumes))


def combine(samples: torch.Tensor) -> list[Prediction]:
    """Predictions (N, B, 5) of N models or Monte-Carlo samples -> one Prediction per scan.

    P(covid) and P(severity | covid) are the means over the N that predict them (NaN marks a task a
    model does not predict; an infinite P(covid), a failed scan, stays infinite); the spread is the standard deviation of P(covid) over those N, and the
    agreement the share of the N with a severity whose most likely severity is the final one.
    """
    covid = samples[..., 0]
    severity = samples[..., 1:]
    mean_covid = torch.nanmean(covid, dim=0)
    spread = torch.nanmean((covid - mean_covid) ** 2, dim=0).sqrt()
    has_severity = ~torch.isnan(severity[..., 0])
    mean_severity = torch.nanmean(severity, dim=0)
    votes = torch.nan_to_num(severity, nan=-1.0).argmax(dim=-1)
    agreement = ((votes == mean_severity.argmax(dim=-1)) & has_severity).sum(0) / has_severity.sum(0).clamp(min=1)
    predictions = []
    for i in range(samples.shape[1]):
        known = bool(has_severity[:, i].any())
        predictions.append(Prediction(
            float(mean_covid[i]),
            mean_severity[i].tolist() if known else None,
            float(spread[i]),
            float(agreement[i]) if known else None,
        ))
    return predictions
