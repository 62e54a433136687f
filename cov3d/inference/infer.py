"""Inference: models -> probabilities per scan, with reflection test-time augmentation (paper §3.5),
ensembles (the mean over models, as in the paper's submission) and Monte-Carlo dropout.

Models are run folders or exported model files (``cov3d.model.files``: safetensors only, never
pickles). Scans (JPEG folders, DICOM series, NIfTI files) are preprocessed by background workers
(``cov3d.inference.streaming``) once per distinct input size, and each CSV row is written as soon as its
scan is predicted, so that an interrupted run keeps its rows and ``resume=True`` skips them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from cov3d.atomic import write_text_atomically
from cov3d.dataset.intensity import Window
from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.dataset.scans import scan_name, scan_number
from cov3d.errors import Cov3dError
from cov3d.inference.streaming import PredictionRows, SizeKey, StreamedScan, completed_paths, read_rows, volume_stream
from cov3d.model.files import ModelSource, expand_models, load_source
from cov3d.model.metrics import PRESENCE_THRESHOLD
from cov3d.preprocessing.cache import values_on
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runtime import autocast, resolve_device, resolve_precision

CSV_COLUMNS = (
    "name", "path", "covid_probability", "covid", "severity",
    "mild_probability", "moderate_probability", "severe_probability", "critical_probability",
)
UNCERTAINTY_COLUMNS = ("covid_probability_std", "severity_agreement")
"""Added with Monte-Carlo dropout: std of P(covid) over samples and models, share of severity votes for the result."""
SUBMISSION_FILES = {"covid": "covid.csv", "non-covid": "non-covid.csv", **{s: f"{s}.csv" for s in SEVERITY_LABELS}}
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
    def severity(self) -> str:
        if self.severity_probabilities is None:
            return ""
        return SEVERITY_LABELS[max(range(4), key=self.severity_probabilities.__getitem__)]


def enable_mc_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Monte-Carlo dropout: dropout layers sample (train mode), everything else (batch norm) stays in eval mode."""
    model.eval()
    for module in model.modules():
        if isinstance(module, DROPOUT_LAYERS):
            module.train()
    return model


class RunPredictor:
    """The models of one run or model file: presence from the best-presence weights, severity from the best-severity ones.

    DICOM and NIfTI scans are mapped to grey levels with the model's window (``ModelSource.window``)
    unless ``window`` overrides it."""

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype | None, mc_samples: int = 0, reflect: bool = True,
        window: Window | str | None = None,
    ):
        self.source, self.device, self.dtype, self.reflect = source, device, dtype, reflect
        self.size, self.fast_decode = source.size, source.fast_decode
        self.window = source.window if window is None else Window.parse(window)
        self.samples_per_scan = max(1, mc_samples)
        self.presence_model = self._load("presence", mc_samples > 0)
        self.severity_model = self._load("severity", mc_samples > 0)

    @property
    def size_key(self) -> SizeKey:
        return (*self.size, self.fast_decode, str(self.window))

    def _load(self, task: str, mc_dropout: bool) -> torch.nn.Module | None:
        model = self.source.build(task)
        if model is None:
            return None
        return (enable_mc_dropout(model) if mc_dropout else model).to(self.device)

    def _probabilities(self, model: torch.nn.Module, volumes: torch.Tensor) -> torch.Tensor:
        """Mean over the scan and its sagittal reflection (unless ``reflect`` is off) of [sigmoid(x), softmax(z)] -> (B, 1 or 6)."""
        outputs = []
        for view in (volumes, volumes.flip(-1)) if self.reflect else (volumes,):
            with torch.no_grad(), autocast(self.device, self.dtype):
                logits = model(view).float()
            parts = [torch.sigmoid(logits[:, :1])]
            if logits.shape[1] > 1:
                parts.append(torch.softmax(logits[:, 1:], dim=1))
            outputs.append(torch.cat(parts, dim=1))
        return torch.stack(outputs).mean(dim=0)

    def _sample(self, volumes: torch.Tensor) -> torch.Tensor:
        """One prediction (B, 5): [P(covid), P(mild..critical | covid)], severity NaN without severity weights."""
        presence = self._probabilities(self.presence_model, volumes) if self.presence_model else None
        severity = self._probabilities(self.severity_model, volumes) if self.severity_model else None
        if presence is not None:
            covid = presence[:, 0]
        else:  # lambda = 1 runs: P(covid) = sum of the four severity classes (paper, after eq. 3)
            covid = severity[:, 2:6].sum(dim=1)
        if severity is not None and severity.shape[1] == 6:
            given_covid = severity[:, 2:6] / severity[:, 2:6].sum(dim=1, keepdim=True)
        else:
            given_covid = torch.full((volumes.shape[0], len(SEVERITY_LABELS)), math.nan)
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

    P(covid) and P(severity | covid) are the means over the N (severity over those that have it);
    the spread is the standard deviation of P(covid) over the N, and the agreement the share of
    the N whose most likely severity is the final one.
    """
    covid = samples[..., 0]
    severity = samples[..., 1:]
    has_severity = ~torch.isnan(severity[..., 0])
    mean_severity = torch.nanmean(severity, dim=0)
    votes = torch.nan_to_num(severity, nan=-1.0).argmax(dim=-1)
    agreement = ((votes == mean_severity.argmax(dim=-1)) & has_severity).sum(0) / has_severity.sum(0).clamp(min=1)
    predictions = []
    for i in range(samples.shape[1]):
        known = bool(has_severity[:, i].any())
        predictions.append(Prediction(
            float(covid[:, i].mean()),
            mean_severity[i].tolist() if known else None,
            float(covid[:, i].std(correction=0)),
            float(agreement[i]) if known else None,
        ))
    return predictions


class Ensemble:
    """Several models (runs or model files), possibly of different input sizes; probabilities are
    averaged over the models (paper §4: the submission's ensemble) and their Monte-Carlo samples."""

    def __init__(
        self, sources: Sequence[ModelSource], device: torch.device, dtype: torch.dtype | None, mc_samples: int = 0,
        reflect: bool = True, window: Window | str | None = None,
    ):
        if not sources:
            raise Cov3dError("No model given: pass --model with a run folder or a file made by 'cov3d export'.")
        self.members = [RunPredictor(source, device, dtype, mc_samples, reflect, window) for source in sources]
        self.device = device

    @property
    def size_keys(self) -> list[SizeKey]:
        """The distinct inputs (D, H, W, fast_decode, window) of the members."""
        return list(dict.fromkeys(member.size_key for member in self.members))

    def predict(self, levels: dict[SizeKey, torch.Tensor]) -> list[Prediction]:
        """Stored uint8 levels (B, 1, D, H, W) for every size key -> one Prediction per scan.

        Each size's batch goes to the device once and becomes values there (``values_on``).
        """
        volumes = {key: values_on(batch, self.device) for key, batch in levels.items()}
        return combine(torch.cat([member.samples(volumes[member.size_key]) for member in self.members]))


def prediction_row(scan: Path, prediction: Prediction, uncertainty: bool = False) -> dict[str, str]:
    """A CSV row (see CSV_COLUMNS, plus UNCERTAINTY_COLUMNS if ``uncertainty``) for one scan."""
    severity = prediction.severity_probabilities or [None] * 4
    row = {
        "name": scan_name(scan),
        "path": str(scan),
        "covid_probability": f"{prediction.covid_probability:.6f}",
        "covid": str(int(prediction.covid)),
        "severity": prediction.severity,
    }
    for label, probability in zip(SEVERITY_LABELS, severity):
        row[f"{label}_probability"] = "" if probability is None else f"{probability:.6f}"
    if uncertainty:
        row["covid_probability_std"] = f"{prediction.covid_probability_std:.6f}"
        agreement = prediction.severity_agreement
        row["severity_agreement"] = "" if agreement is None else f"{agreement:.4f}"
    return row


def write_submission(rows: Iterable[dict[str, str]], submission_dir: Path) -> None:
    """Competition files: one scan name per line, no header, sorted by the number in the name."""
    submission_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {label: [] for label in SUBMISSION_FILES}
    for row in rows:
        groups["covid" if row["covid"] == "1" else "non-covid"].append(row["name"])
        if row["severity"]:
            groups[row["severity"]].append(row["name"])
    with_severity = any(groups[label] for label in SEVERITY_LABELS)
    for label, names in groups.items():
        if label in SEVERITY_LABELS and not with_severity:
            continue
        ordered = sorted(names, key=lambda name: (scan_number(name), name))
        write_text_atomically(submission_dir / SUBMISSION_FILES[label], "".join(f"{name}\n" for name in ordered),
                              "Free some space, then run the same command with --resume to write them again.")


@dataclass
class InferenceSummary:
    """What ``infer`` did: rows written now, scans skipped as already in the CSV, and failures."""

    predicted: int = 0
    covid: int = 0
    resumed: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)


def infer(
    scan_dirs: Sequence[Path],
    models: Path | Sequence[Path],
    output: Path,
    *,
    cache_dir: Path,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 2,
    submission_dir: Path | None = None,
    progress: bool = True,
    mc_samples: int = 0,
    workers: int = 0,
    resume: bool = False,
    seed: int = 0,
    reflect: bool = True,
    window: Window | str | None = None,
    on_row: Callable[[dict[str, str]], None] | None = None,
) -> InferenceSummary:
    """Predict every scan with the ensemble of ``models`` (run folders, exported model files or
    folders of them) and write the CSV ``output`` row by row (``on_row`` is called after each).

    ``mc_samples`` > 0: Monte-Carlo dropout with that many samples per model (seeded by ``seed``),
    adding UNCERTAINTY_COLUMNS. ``workers``: background preprocessing processes (0: none).
    ``resume``: keep the rows already in ``output`` and predict only the other scans.
    ``reflect``: average each scan with its sagittal reflection (the paper's test-time augmentation).
    ``window``: the HU -> grey mapping (``LEVEL,WIDTH``) for DICOM/NIfTI scans, for every model;
    default: each model's own (``ModelSource.window``).
    Submission files, if asked for, cover every row of ``output``.
    """
    if mc_samples < 0 or workers < 0 or batch_size < 1:
        raise Cov3dError("mc_samples and workers must be >= 0 and batch_size >= 1.")
    torch_device = resolve_device(device)
    model_paths = [models] if isinstance(models, (str, Path)) else list(models)
    sources = [load_source(path) for path in expand_models(model_paths)]
    ensemble = Ensemble(sources, torch_device, resolve_precision(precision, torch_device), mc_samples, reflect,
                        None if window is None else Window.parse(window))
    torch.manual_seed(seed)
    columns = CSV_COLUMNS + (UNCERTAINTY_COLUMNS if mc_samples else ())
    done = completed_paths(output, columns) if resume else set()
    pending = [scan for scan in scan_dirs if str(scan) not in done]
    summary = InferenceSummary(resumed=len(scan_dirs) - len(pending))
    caches = {key: VolumeCache(cache_dir, *key[:3], fast_decode=key[3], window=key[4]) for key in ensemble.size_keys}

    def predict(batch: list[StreamedScan], rows_file: PredictionRows) -> None:
        levels = {key: torch.stack([item.volumes[key] for item in batch]) for key in caches}
        rows = []
        for item, prediction in zip(batch, ensemble.predict(levels)):
            rows.append(prediction_row(item.scan, prediction, uncertainty=mc_samples > 0))
            summary.predicted += 1
            summary.covid += prediction.covid
        rows_file.write(rows)
        if on_row is not None:
            for row in rows:
                on_row(row)

    with PredictionRows(output, columns, resume) as rows_file, Progress(disable=not progress) as bar:
        task = bar.add_task("Predicting", total=len(pending))
        batch: list[StreamedScan] = []
        for item in volume_stream(pending, caches, workers):
            if item.volumes is None:
                summary.failed.append((item.scan, item.error or "unknown error"))
            else:
                batch.append(item)
            if len(batch) == batch_size:
                predict(batch, rows_file)
                batch = []
            if progress:  # rich keeps samples of every advance
                bar.advance(task)
        if batch:
            predict(batch, rows_file)
    if submission_dir is not None:
        write_submission(read_rows(output), submission_dir)
    return summary
