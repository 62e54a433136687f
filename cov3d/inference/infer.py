"""Inference: scans -> a predictions CSV (and competition submission files), with the ensemble of
``cov3d.inference.ensemble`` and ``cov3d.model.predictor`` (reflection test-time augmentation, the mean over models, Monte-Carlo dropout).

Models are run folders or exported model files (``cov3d.model.files``: safetensors only, never
pickles). Scans (JPEG folders, DICOM series, NIfTI files) are preprocessed by background workers
(``cov3d.inference.streaming``) once per distinct input size, and each CSV row is written as soon as its
scan is predicted, so that an interrupted run keeps its rows and ``resume=True`` skips them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from cov3d.atomic import write_text_atomically
from cov3d.dataset.domain import flags_cell
from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.dataset.scans import scan_name, scan_number
from cov3d.errors import Cov3dError
from cov3d.inference.ensemble import Ensemble
from cov3d.inference.flags import DomainChecks, flag_counts
from cov3d.inference.record import check_same_rows, ensemble_record, is_record, write_record
from cov3d.inference.streaming import PredictionRows, StreamedScan, completed_paths, read_rows, volume_stream
from cov3d.limits import COUNT, OPTIONAL_COUNT, SEED, SIZE
from cov3d.locks import writing
from cov3d.model.files import expand_models, load_source
from cov3d.model.predictor import Prediction
from cov3d.outputs import (
    OutputFolder,
    check_output,
    csv_header,
    has_header,
    real,
    refuse_inside,
    refuse_run_file,
    submission_name_problem,
)
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import available_cpus
from cov3d.runfiles import predictions_record
from cov3d.runtime import resolve_device, resolve_precision
from cov3d.settings import INFER_BATCH_SIZE, INFER_SEED
from cov3d.window import MODEL_WINDOW, ModelWindow, Window

CSV_COLUMNS = (
    "name", "path", "covid_probability", "covid", "severity",
    "mild_probability", "moderate_probability", "severe_probability", "critical_probability",
)
UNCERTAINTY_COLUMNS = ("covid_probability_std", "severity_agreement")
"""Added with Monte-Carlo dropout: std of P(covid) over samples and models, share of severity votes for the result."""
FLAGS_COLUMN = "flags"
"""The last column: the scan's flags (``cov3d.dataset.domain.flags_cell``), empty when nothing is wrong."""
SUBMISSION_FILES = {"covid": "covid.csv", "non-covid": "non-covid.csv", **{s: f"{s}.csv" for s in SEVERITY_LABELS}}


def prediction_columns(uncertainty: bool) -> tuple[str, ...]:
    """The CSV's columns in order: CSV_COLUMNS, UNCERTAINTY_COLUMNS with Monte-Carlo dropout, FLAGS_COLUMN."""
    return CSV_COLUMNS + (UNCERTAINTY_COLUMNS if uncertainty else ()) + (FLAGS_COLUMN,)


def prediction_row(scan: Path, prediction: Prediction, uncertainty: bool = False,
                   flags: Iterable[str] = ()) -> dict[str, str]:
    """A CSV row (``prediction_columns(uncertainty)``) for one scan with its ``flags`` (codes)."""
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
    row[FLAGS_COLUMN] = flags_cell(list(flags))
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
    """What ``infer`` did: rows written now, scans skipped as already in the CSV, failures, and
    the scans predicted now that were flagged (with ``{flag: reason}``; left out of the CSV when
    ``skipped_flagged``)."""

    predicted: int = 0
    covid: int = 0
    resumed: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    calibration: str = ""
    """One line: whether the probabilities are calibrated (``calibration_note``)."""
    flagged: list[tuple[Path, dict[str, str]]] = field(default_factory=list)
    skipped_flagged: bool = False

    @property
    def flagged_line(self) -> str | None:
        """'3 of 4 scans flagged: not-ct 1, no-lungs 2, synthetic-model 3' (``None`` when none was)."""
        if not self.flagged:
            return None
        counts = flag_counts(flags for _, flags in self.flagged)
        left_out = " (left out of the CSV: --skip-flagged)" if self.skipped_flagged else ""
        return f"{len(self.flagged)} of {self.predicted} scans flagged: {counts}{left_out}"


def calibration_note(ensemble: Ensemble, calibrated: bool) -> str:
    """Whether the ensemble's probabilities are calibrated, naming the models and tasks that are not."""
    if not calibrated:
        return "Probabilities uncalibrated (--uncalibrated); the decisions are the same either way."
    missing = ensemble.uncalibrated()
    if not missing:
        return "Probabilities calibrated (each model's temperatures, fitted on its validation scans)."
    listed = ", ".join(f"{task} of {path}" for path, task in missing)
    return (f"Probabilities uncalibrated for {listed}: no temperature recorded (trained before calibration, "
            "or no validation scan for the task); the decisions are the same either way.")


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
    window: Window | ModelWindow = MODEL_WINDOW,
    on_row: Callable[[dict[str, str]], None] | None = None,
    overwrite: bool = False,
    calibrated: bool = True,
    skip_flagged: bool = False,
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
    ``window``: the HU -> grey mapping for DICOM/NIfTI scans, for every model; ``MODEL_WINDOW``:
    each model's own (``ModelSource.window``).
    ``calibrated``: report probabilities at each model's temperatures (decisions are the same either
    way); ``summary.calibration`` says which are not calibrated.
    Submission files, if asked for, cover every row of ``output``.
    Each scan's flags (``cov3d.inference.flags``) are in its row and in ``flagged``; with
    ``skip_flagged`` a flagged scan gets no row (nor a line in the submission files).

    Outputs are checked before anything is written (``check_outputs``), and locked while they are
    (``cov3d.locks.writing``: another process writing them is refused). What made the rows is recorded
    beside the CSV (``cov3d.inference.record``); ``resume`` refuses a CSV begun by other models or
    settings. Scans are told apart by
    their resolved paths, so a resumed run skips them however their paths are spelled. A scan
    whose name cannot be written in a submission file, or whose prediction is not finite, is
    reported in ``failed`` and gets no row.
    """
    check_inference_options(batch_size=batch_size, mc_samples=mc_samples, workers=workers, seed=seed)
    workers = default_workers() if workers is None else workers
    torch_device = resolve_device(device)
    model_paths = expand_models([models] if isinstance(models, (str, Path)) else list(models))
    presence_paths, severity_paths = expand_models(list(presence_models)), expand_models(list(severity_models))
    columns = prediction_columns(mc_samples > 0)
    submission = check_outputs(output, submission_dir, [*scan_dirs, *model_paths, *presence_paths, *severity_paths],
                               resume=resume, overwrite=overwrite)
    if resume:
        refuse_without_flags(output, columns)
    with writing(output), writing(submission_dir, "--submission-dir") if submission_dir else contextlib.nullcontext():
        ensemble = Ensemble(
            [load_source(path) for path in model_paths], torch_device, resolve_precision(precision, torch_device),
            mc_samples, reflect, presence_sources=[load_source(path) for path in presence_paths],
            severity_sources=[load_source(path) for path in severity_paths],
            window=window, calibrated=calibrated,
        )
        checks = DomainChecks([(member.source, member.shape) for member in ensemble.members])
        record = ensemble_record(ensemble, reflect=reflect, mc_samples=mc_samples, calibrated=calibrated,
                                 skip_flagged=skip_flagged)
        torch.manual_seed(seed)
        done = {real(Path(path)) for path in completed_paths(output, columns)} if resume else set()
        if done:
            check_same_rows(output, record)
        pending = [scan for scan in scan_dirs if real(scan) not in done]
        summary = InferenceSummary(resumed=len(scan_dirs) - len(pending), calibration=calibration_note(ensemble, calibrated),
                                   skipped_flagged=skip_flagged)
        for scan in pending:
            problem = submission_name_problem(scan_name(scan))
            if problem is not None:
                summary.failed.append((scan, f"its name {scan_name(scan)!r} cannot be written in a submission file: {problem}. Rename the scan."))
        pending = [scan for scan in pending if submission_name_problem(scan_name(scan)) is None]
        caches = {shape: VolumeCache(cache_dir, shape) for shape in ensemble.shapes}

        def predict(batch: list[StreamedScan], rows_file: PredictionRows) -> None:
            levels = {shape: torch.stack([item.volumes[shape] for item in batch]) for shape in caches}
            rows = []
            for item, prediction in zip(batch, ensemble.predict(levels)):
                if not prediction.finite:
                    summary.failed.append((item.scan, "the model gave a non-finite prediction (NaN or infinity); "
                                                      "check the scan, the model's weights, or try --precision fp32."))
                    continue
                flags = checks.flags(item.domain, item.volumes)
                summary.predicted += 1
                summary.covid += prediction.covid
                if flags:
                    summary.flagged.append((item.scan, flags))
                    if skip_flagged:
                        continue
                rows.append(prediction_row(item.scan, prediction, uncertainty=mc_samples > 0, flags=flags))
            rows_file.write(rows)
            if on_row is not None:
                for row in rows:
                    on_row(row)

        with PredictionRows(output, columns, resume) as rows_file, Progress(disable=not progress) as bar:
            if not done:
                write_record(output, record)
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


PREDICTION_HEADERS = (prediction_columns(False), prediction_columns(True), CSV_COLUMNS, CSV_COLUMNS + UNCERTAINTY_COLUMNS)
"""The header rows of cov3d's predictions CSVs (without and with Monte-Carlo dropout; then those
of cov3d before the flags column), which a new CSV may replace."""


def refuse_without_flags(output: Path, columns: Sequence[str]) -> None:
    """``Cov3dError`` for resuming a CSV of an earlier cov3d, without the flags column: its rows
    cannot be continued with flagged ones."""
    header = csv_header(output) if Path(output).is_file() else None
    if header is not None and header + (FLAGS_COLUMN,) == tuple(columns):
        raise Cov3dError(
            f"{output} was written by an earlier cov3d, without the '{FLAGS_COLUMN}' column, so it cannot be resumed: "
            "run without --resume to predict every scan again (it is replaced), or give another --output."
        )


def check_outputs(
    output: Path, submission_dir: Path | None, inputs: Sequence[Path], *, resume: bool, overwrite: bool
) -> OutputFolder | None:
    """Refuse, before anything is written, a predictions CSV or submission folder that would
    write over an input (scans, models) or a run's file, or over a file that is not cov3d's
    earlier output of that kind (unless ``overwrite``); with ``resume`` an existing CSV is
    continued instead (``completed_paths`` checks its header, ``check_same_rows`` its record). The
    CSV's record (``cov3d.runfiles.predictions_record``) is checked with it. Returns the submission folder."""
    output = Path(output)
    if resume and os.path.lexists(output):
        refuse_inside(output, inputs)
        refuse_run_file(output)
    else:
        check_output(output, kind="predictions CSV", is_own=lambda path: has_header(path, PREDICTION_HEADERS),
                     overwrite=overwrite, inputs=inputs)
        check_output(predictions_record(output), kind="record of predictions", is_own=is_record, overwrite=overwrite,
                     inputs=inputs, announce=False)
    if submission_dir is None:
        return None
    folder = OutputFolder(submission_dir, kind="submission file", overwrite=overwrite, inputs=inputs,
                          option="--submission-dir")
    if real(output) in {real(folder.folder / name) for name in SUBMISSION_FILES.values()}:
        raise Cov3dError(f"{output} is one of the submission files of {submission_dir}: give another --output.")
    folder.claim(SUBMISSION_FILES.values())
    return folder
