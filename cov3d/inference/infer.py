"""Inference: models -> probabilities per scan, with reflection test-time augmentation (paper §3.5),
ensembles (the mean over models, as in the paper's submission) and Monte-Carlo dropout.

Models are run folders or exported model files (``cov3d.model.files``: safetensors only, never
pickles). Scans (JPEG folders, DICOM series, NIfTI files) are preprocessed by background workers
(``cov3d.inference.streaming``) once per distinct input size, and each CSV row is written as soon as its
scan is predicted, so that an interrupted run keeps its rows and ``resume=True`` skips them.
"""

from __future__ import annotations

import math
import os
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
from cov3d.inference.streaming import PredictionRows, StreamedScan, completed_paths, read_rows, volume_stream
from cov3d.limits import COUNT, OPTIONAL_COUNT, SEED, SIZE
from cov3d.model.files import ModelSource, expand_models, load_source
from cov3d.model.metrics import PRESENCE_THRESHOLD
from cov3d.outputs import (
    OutputFolder,
    check_output,
    has_header,
    real,
    refuse_inside,
    refuse_run_file,
    submission_name_problem,
)
from cov3d.preprocessing.cache import values_on
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import available_cpus
from cov3d.runtime import autocast, resolve_device, resolve_precision
from cov3d.settings import INFER_BATCH_SIZE, INFER_SEED, VolumeShape

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
    def finite(self) -> bool:
        """Whether every model gave finite outputs for the scan (else it is no prediction at all)."""
        return math.isfinite(self.covid_probability)

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


TASKS = ("presence", "severity")


class RunPredictor:
    """The models of one run or model file: presence from the best-presence weights, severity from the
    best-severity ones; ``tasks`` limits it to one of the two (e.g. a presence member of an ensemble
    whose severity comes from other runs).

    DICOM and NIfTI scans are mapped to grey levels with the model's window (``ModelSource.window``)
    unless ``window`` overrides it (``shape``: the inputs it expects, window included)."""

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype | None, mc_samples: int = 0, reflect: bool = True,
        tasks: Sequence[str] = TASKS, window: Window | str | None = None,
    ):
        self.source, self.device, self.dtype, self.reflect = source, device, dtype, reflect
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
        """One prediction (B, 5): [P(covid), P(mild..critical | covid)], NaN for a task this member does
        not predict (severity also without severity weights); P(covid) infinite for a scan whose model
        outputs were not finite, which ``combine`` keeps (``Prediction.finite``)."""
        batch = volumes.shape[0]
        presence = self._probabilities(self.presence_model, volumes) if self.presence_model else None
        severity = self._probabilities(self.severity_model, volumes) if self.severity_model else None
        if "presence" not in self.tasks:
            covid = torch.full((batch,), math.nan, device=volumes.device)
        elif presence is not None:
            covid = presence[:, 0]
        else:  # lambda = 1 runs: P(covid) = sum of the four severity classes (paper, after eq. 3)
            covid = severity[:, 2:6].sum(dim=1)
        if "severity" in self.tasks and severity is not None and severity.shape[1] == 6:
            given_covid = severity[:, 2:6] / severity[:, 2:6].sum(dim=1, keepdim=True)
        else:
            given_covid = torch.full((batch, len(SEVERITY_LABELS)), math.nan)
        finite = torch.ones(batch, dtype=torch.bool, device=covid.device)
        for outputs in (presence, severity):
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


class Ensemble:
    """Several models (runs or model files), possibly of different input sizes; probabilities are
    averaged over the models (paper §4: the submission's ensemble) and their Monte-Carlo samples.

    ``sources`` predict both tasks; ``presence_sources`` only presence and ``severity_sources`` only
    severity (the paper submitted different models for the two tasks). Without any model for
    presence, P(covid) is the severity models' sum of s_1..s_4 (as for a lambda = 1 run).
    """

    def __init__(
        self, sources: Sequence[ModelSource], device: torch.device, dtype: torch.dtype | None, mc_samples: int = 0,
        reflect: bool = True, *, presence_sources: Sequence[ModelSource] = (),
        severity_sources: Sequence[ModelSource] = (), window: Window | str | None = None,
    ):
        if not (sources or presence_sources or severity_sources):
            raise Cov3dError("No model given: pass `models` with a run folder or a file made by 'cov3d export'.")
        for source in severity_sources:
            if "severity" not in source.states or source.config["outputs"] < 6:
                raise Cov3dError(f"{source.path} has no severity weights (a lambda = 0 run?): it cannot be a severity model.")
        severity_tasks = ("severity",) if sources or presence_sources else TASKS
        members = [(source, TASKS) for source in sources]
        members += [(source, ("presence",)) for source in presence_sources]
        members += [(source, severity_tasks) for source in severity_sources]
        self.members = [
            RunPredictor(source, device, dtype, mc_samples, reflect, tasks, window) for source, tasks in members
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
        return combine(torch.cat([member.samples(volumes[member.shape]) for member in self.members]))


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


def write_submission(rows: Iterable[dict[str, str]], submission_dir: Path) -> list[Path]:
    """Competition files: one scan name per line, no header, sorted by the number in the name.

    A scan listed more than once (its path spelled differently) counts once, with its last row.
    Raises ``Cov3dError`` for a name that cannot be one line of these files. Returns the files written.
    """
    unique = {real(Path(row["path"])): row for row in rows}
    for row in unique.values():
        problem = submission_name_problem(row["name"])
        if problem is not None:
            raise Cov3dError(f"Scan {row['path']!r} cannot be listed in a submission file: {problem}. Rename the scan.")
    submission_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {label: [] for label in SUBMISSION_FILES}
    written = []
    for row in unique.values():
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
        written.append(submission_dir / SUBMISSION_FILES[label])
    return written


@dataclass
class InferenceSummary:
    """What ``infer`` did: rows written now, scans skipped as already in the CSV, and failures."""

    predicted: int = 0
    covid: int = 0
    resumed: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)


def default_workers() -> int:
    """Background preprocessing processes of ``infer`` when not given: half the CPU cores, at least 1
    (the other half runs the model)."""
    return max(1, available_cpus() // 2)


def check_inference_options(*, batch_size: int, mc_samples: int, workers: int | None, seed: int) -> None:
    """``OptionOutOfRange`` for an option of ``infer`` out of range (``cov3d.limits``)."""
    SIZE.check("batch_size", batch_size)
    COUNT.check("mc_samples", mc_samples)
    OPTIONAL_COUNT.check("workers", workers)
    SEED.check("seed", seed)


def infer(
    scan_dirs: Sequence[Path],
    models: Path | Sequence[Path],
    output: Path,
    *,
    presence_models: Sequence[Path] = (),
    severity_models: Sequence[Path] = (),
    cache_dir: Path,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = INFER_BATCH_SIZE,
    submission_dir: Path | None = None,
    progress: bool = True,
    mc_samples: int = 0,
    workers: int | None = None,
    resume: bool = False,
    seed: int = INFER_SEED,
    reflect: bool = True,
    window: Window | str | None = None,
    on_row: Callable[[dict[str, str]], None] | None = None,
    overwrite: bool = False,
) -> InferenceSummary:
    """Predict every scan with the ensemble of ``models`` (run folders, exported model files or
    folders of them) and write the CSV ``output`` row by row (``on_row`` is called after each).

    ``presence_models`` and ``severity_models`` add models for one task only: P(covid) is the mean
    over ``models`` and ``presence_models``, the severity the mean over ``models`` and
    ``severity_models`` (see ``Ensemble``). ``models`` may then be empty.

    ``mc_samples`` > 0: Monte-Carlo dropout with that many samples per model (seeded by ``seed``),
    adding UNCERTAINTY_COLUMNS. ``workers``: background preprocessing processes (0: none;
    ``None``: ``default_workers()``).
    ``resume``: keep the rows already in ``output`` and predict only the other scans.
    ``reflect``: average each scan with its sagittal reflection (the paper's test-time augmentation).
    ``window``: the HU -> grey mapping (``LEVEL,WIDTH``) for DICOM/NIfTI scans, for every model;
    default: each model's own (``ModelSource.window``).
    Submission files, if asked for, cover every row of ``output``.

    Outputs are checked before anything is written (``check_outputs``). Scans are told apart by
    their resolved paths, so a resumed run skips them however their paths are spelled. A scan
    whose name cannot be written in a submission file, or whose prediction is not finite, is
    reported in ``failed`` and gets no row.
    """
    check_inference_options(batch_size=batch_size, mc_samples=mc_samples, workers=workers, seed=seed)
    workers = default_workers() if workers is None else workers
    torch_device = resolve_device(device)
    model_paths = expand_models([models] if isinstance(models, (str, Path)) else list(models))
    presence_paths, severity_paths = expand_models(list(presence_models)), expand_models(list(severity_models))
    columns = CSV_COLUMNS + (UNCERTAINTY_COLUMNS if mc_samples else ())
    submission = check_outputs(output, submission_dir, [*scan_dirs, *model_paths, *presence_paths, *severity_paths],
                               resume=resume, overwrite=overwrite)
    ensemble = Ensemble(
        [load_source(path) for path in model_paths], torch_device, resolve_precision(precision, torch_device),
        mc_samples, reflect, presence_sources=[load_source(path) for path in presence_paths],
        severity_sources=[load_source(path) for path in severity_paths],
        window=window,
    )
    torch.manual_seed(seed)
    done = {real(Path(path)) for path in completed_paths(output, columns)} if resume else set()
    pending = [scan for scan in scan_dirs if real(scan) not in done]
    summary = InferenceSummary(resumed=len(scan_dirs) - len(pending))
    for scan in pending:
        problem = submission_name_problem(scan_name(scan))
        if problem is not None:
            summary.failed.append((scan, f"its name {scan_name(scan)!r} cannot be written in a submission file: {problem}. Rename the scan."))
    pending = [scan for scan in pending if submission_name_problem(scan_name(scan)) is None]
    caches = {shape: VolumeCache.for_shape(cache_dir, shape) for shape in ensemble.shapes}

    def predict(batch: list[StreamedScan], rows_file: PredictionRows) -> None:
        levels = {shape: torch.stack([item.volumes[shape] for item in batch]) for shape in caches}
        rows = []
        for item, prediction in zip(batch, ensemble.predict(levels)):
            if not prediction.finite:
                summary.failed.append((item.scan, "the model gave a non-finite prediction (NaN or infinity); "
                                                  "check the scan, the model's weights, or try --precision fp32."))
                continue
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
    if submission is not None:
        submission.record(write_submission(read_rows(output), submission.folder))
    return summary


PREDICTION_HEADERS = (CSV_COLUMNS, CSV_COLUMNS + UNCERTAINTY_COLUMNS)
"""The header rows of cov3d's predictions CSVs (without and with Monte-Carlo dropout)."""


def check_outputs(
    output: Path, submission_dir: Path | None, inputs: Sequence[Path], *, resume: bool, overwrite: bool
) -> OutputFolder | None:
    """Refuse, before anything is written, a predictions CSV or submission folder that would
    write over an input (scans, models) or a run's file, or over a file that is not cov3d's
    earlier output of that kind (unless ``overwrite``); with ``resume`` an existing CSV is
    continued instead (``completed_paths`` checks its header). Returns the submission folder."""
    output = Path(output)
    if resume and os.path.lexists(output):
        refuse_inside(output, inputs)
        refuse_run_file(output)
    else:
        check_output(output, kind="predictions CSV", is_own=lambda path: has_header(path, PREDICTION_HEADERS),
                     overwrite=overwrite, inputs=inputs)
    if submission_dir is None:
        return None
    folder = OutputFolder(submission_dir, kind="submission file", overwrite=overwrite, inputs=inputs,
                          option="--submission-dir")
    if real(output) in {real(folder.folder / name) for name in SUBMISSION_FILES.values()}:
        raise Cov3dError(f"{output} is one of the submission files of {submission_dir}: give another --output.")
    folder.claim(SUBMISSION_FILES.values())
    return folder
