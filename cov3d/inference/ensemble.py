"""Ensembles: several runs or model files (possibly of different input sizes) whose probabilities
are averaged (the mean over models, as in the paper's submission), each member a
``cov3d.model.predictor.RunPredictor``. A model given twice (by two paths, as a run and its export, or
inside a folder also given) counts once: models are told apart by ``ModelSource.digest``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cov3d.errors import Cov3dError
from cov3d.logits import has_severity
from cov3d.model.files import ModelSource
from cov3d.model.predictor import Prediction, RunPredictor, combine
from cov3d.outputs import notice
from cov3d.preprocessing.cache import values_on
from cov3d.runfiles import TASKS
from cov3d.settings import VolumeShape
from cov3d.window import MODEL_WINDOW, ModelWindow, Window


def distinct_models(sources: Sequence[ModelSource], seen: dict[str, ModelSource]) -> list[ModelSource]:
    """``sources`` without the models already in ``seen`` (by ``ModelSource.digest``) or repeated among
    them, each dropped with a one-line notice; ``seen`` gains the ones kept."""
    kept = []
    for source in sources:
        first = seen.get(source.digest)
        if first is None:
            seen[source.digest] = source
            kept.append(source)
        elif first is source or first.path == source.path:
            notice(f"Model {source.path} is given more than once: it is counted once.")
        else:
            notice(f"Model {source.path} is the same model as {first.path} (identical weights and settings): it is counted once.")
    return kept


class Ensemble:
    """Several models (runs or model files), possibly of different input sizes; probabilities are
    averaged over the models (paper §4: the submission's ensemble) and their Monte-Carlo samples.

    ``sources`` predict both tasks; ``presence_sources`` only presence and ``severity_sources`` only
    severity (the paper submitted different models for the two tasks). Without any model for
    presence, P(covid) is the severity models' sum of s_1..s_4 (as for a lambda = 1 run). Each model
    counts once per task (``distinct_models``): a repeat, or a one-task model also given for both
    tasks, is dropped with a notice. Each member applies its own temperatures unless ``calibrated`` is
    off; decisions come from the uncalibrated mean (``cov3d.model.predictor.combine``).
    """

    def __init__(
        self, sources: Sequence[ModelSource], device: torch.device, dtype: torch.dtype | None, mc_samples: int = 0,
        reflect: bool = True, *, presence_sources: Sequence[ModelSource] = (),
        severity_sources: Sequence[ModelSource] = (), window: Window | ModelWindow = MODEL_WINDOW,
        calibrated: bool = True,
    ):
        both_tasks: dict[str, ModelSource] = {}
        sources = distinct_models(sources, both_tasks)
        presence_sources = distinct_models(presence_sources, dict(both_tasks))
        severity_sources = distinct_models(severity_sources, dict(both_tasks))
        if not (sources or presence_sources or severity_sources):
            raise Cov3dError("No model given: pass `models` with a run folder or a file made by 'cov3d export'.")
        for source in severity_sources:
            if "severity" not in source.states or not has_severity(source.config["outputs"]):
                raise Cov3dError(f"{source.path} has no severity weights (a lambda = 0 run?): it cannot be a severity model.")
        severity_tasks = ("severity",) if sources or presence_sources else TASKS
        members = [(source, TASKS) for source in sources]
        members += [(source, ("presence",)) for source in presence_sources]
        members += [(source, severity_tasks) for source in severity_sources]
        self.members = [
            RunPredictor(source, device, dtype, mc_samples, reflect, tasks, window, calibrated)
            for source, tasks in members
        ]
        self.device = device

    @property
    def shapes(self) -> list[VolumeShape]:
        """The distinct inputs of the members (size, fast decoding, warp and window)."""
        return list(dict.fromkeys(member.shape for member in self.members))

    def predict(self, levels: dict[VolumeShape, torch.Tensor]) -> list[Prediction]:
        """Stored uint8 levels (B, 1, D, H, W) for every input shape -> one Prediction per scan.

        Each shape's batch goes to the device once and becomes values there (``values_on``).
        """
        volumes = {shape: values_on(batch, self.device) for shape, batch in levels.items()}
        drawn = [member.samples(volumes[member.shape]) for member in self.members]
        return combine(torch.cat([samples.raw for samples in drawn]), torch.cat([samples.calibrated for samples in drawn]))

    def uncalibrated(self) -> list[tuple[str, str]]:
        """(model path, task) of each task a member predicts without a temperature."""
        return [(str(member.source.path), task) for member in self.members for task in member.uncalibrated_tasks]
