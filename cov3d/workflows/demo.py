"""`cov3d demo`: generate a synthetic dataset, preprocess, train, infer and score, on a CPU in minutes.

The demo keeps the paper's method (loss, schedule, reflection, checkpoints) but shrinks the problem so
that it fits a laptop: fewer and thinner synthetic scans, small volumes, no Kinetics weights (they
cannot be assumed offline), a larger batch and learning rate to train from scratch in a few epochs
(``cov3d.demo_settings.DemoSettings``), and a scan count, volume size and number of epochs chosen from the
precision in use (``cov3d.demo_settings.DEMO_WORKLOADS``). Each step is logged (``logging``); the caller shows the report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from sklearn.linear_model import LogisticRegression

from cov3d.dataset.layout import SEVERITY_CATEGORIES, SEVERITY_LABELS, read_answer_key
from cov3d.dataset.scans import find_scans
from cov3d.demo_settings import DEMO_WORKLOADS, DemoSettings, demo_workload
from cov3d.errors import BaselineNotBeaten
from cov3d.inference.infer import infer
from cov3d.limits import WORKERS
from cov3d.model.metrics import macro_f1
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import preprocess_many
from cov3d.runfiles import SUMMARY_FILE
from cov3d.runtime import choose_precision, machine_description, resolve_device
from cov3d.synthetic.generator import TEST_FOLDER, TEST_LABELS_CSV, generate_dataset
from cov3d.training.data import TrainingItem, collect_items
from cov3d.training.train import train

logger = logging.getLogger(__name__)

SEVERITY_CODES = list(SEVERITY_CATEGORIES)


@dataclass
class LabelledScan:
    """A scan with its true labels: has_covid 0/1 and severity 0..4 (0 = unknown or negative)."""

    path: Path
    has_covid: int
    severity: int


@dataclass
class DemoReport:
    """Scores per split for the model and the baseline, and seconds per step."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    run_dir: Path | None = None
    predictions: Path | None = None


def labelled_test_split(data_dir: Path) -> list[LabelledScan]:
    """The test scans with their labels from the answer key kept beside (not inside) the test folder."""
    key = read_answer_key(data_dir / TEST_LABELS_CSV)
    return [LabelledScan(path, *key[path.name]) for path in find_scans([data_dir / TEST_FOLDER])]


def score_rows(scans: list[LabelledScan], rows: dict[str, dict[str, str]]) -> dict[str, float]:
    """Presence macro F1 over all scans; severity macro F1 over scans with a known severity."""
    predicted = [rows[str(scan.path)] for scan in scans]
    presence = macro_f1([s.has_covid for s in scans], [int(r["covid"]) for r in predicted], [0, 1])
    graded = [(s.severity, SEVERITY_LABELS.index(r["severity"]) + 1) for s, r in zip(scans, predicted) if s.severity]
    severity = macro_f1(*map(list, zip(*graded)), SEVERITY_CODES) if graded else float("nan")
    return {"presence_f1": presence, "severity_f1": severity}


def baseline_scores(
    train_scans: list[LabelledScan], splits: dict[str, list[LabelledScan]], cache: VolumeCache
) -> dict[str, dict[str, float]]:
    """Logistic regression on each scan's mean intensity: the trivial baseline the model must beat."""

    def mean_intensity(scans: list[LabelledScan]) -> np.ndarray:
        return np.array([[float(cache.get(scan.path).mean())] for scan in scans])

    presence = LogisticRegression().fit(mean_intensity(train_scans), [s.has_covid for s in train_scans])
    graded_train = [s for s in train_scans if s.severity]
    severity = LogisticRegression().fit(mean_intensity(graded_train), [s.severity for s in graded_train])
    scores = {}
    for name, scans in splits.items():
        graded = [s for s in scans if s.severity]
        scores[name] = {
            "presence_f1": macro_f1([s.has_covid for s in scans], presence.predict(mean_intensity(scans)).tolist(), [0, 1]),
            "severity_f1": macro_f1([s.severity for s in graded], severity.predict(mean_intensity(graded)).tolist(), SEVERITY_CODES),
        }
    return scores


def labelled(items: list[TrainingItem], partition: str) -> list[LabelledScan]:
    return [LabelledScan(i.path, i.has_covid, i.severity) for i in items if i.partition == partition]


def run_demo(
    output_dir: Path, settings: DemoSettings, *, workers: int | None = None, device: str = "auto",
    precision: str = "auto", console: Console | None = None,
) -> DemoReport:
    """Generate -> preprocess -> train -> infer -> score; everything is written under `output_dir`.

    Each step is logged; ``console`` shows the progress bars. Returns the scores and times.
    """
    WORKERS.check("workers", workers)
    chosen = choose_precision(precision, resolve_device(device))
    settings = settings.with_workload(chosen.name)
    settings.train_settings()  # refuses what the training would refuse, before generating anything
    logger.info("This machine: %s; precision %s (%s). The demo generates %d scans and trains %d epochs at %s%s.",
                machine_description(resolve_device(device)), chosen.name, chosen.reason, settings.scans,
                settings.epochs, settings.shape, workload_note(settings, chosen.name))
    console = console or Console(stderr=True)
    report = DemoReport()
    data_dir, cache_dir = output_dir / "data", output_dir / "cache"
    clock = time.perf_counter()

    def step_done(name: str) -> None:
        nonlocal clock
        report.seconds[name] = time.perf_counter() - clock
        logger.info("✓ %s (%.0f s)", name, report.seconds[name])
        clock = time.perf_counter()

    logger.info("1/4 Generating synthetic chest CT scans")
    with Progress(console=console) as bar:
        task = bar.add_task("Generating", total=settings.scans)
        generate_dataset(
            data_dir, scans=settings.scans, seed=settings.seed, slice_size=settings.slice_size,
            depth_scale=settings.depth_scale, annotated_fraction=settings.annotated_fraction,
            overwrite=True, masks=True, workers=workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    step_done("generate")

    logger.info("2/4 Preprocessing to %s", settings.shape)
    items = collect_items(data_dir)
    splits = {"validation": labelled(items, "validation"), "test": labelled_test_split(data_dir)}
    cache = VolumeCache(cache_dir, settings.shape)
    preprocess_many([i.path for i in items] + [s.path for s in splits["test"]], cache, workers=workers)
    step_done("preprocess")

    logger.info("3/4 Training (from scratch, 1cycle)")
    report.run_dir = output_dir / "run"
    train(data_dir, report.run_dir, settings.train_settings(), cache_dir=cache_dir, pretrained=False,
          device=device, precision=precision, workers=workers, overwrite=True)  # the demo's own run, as its data
    step_done("train")

    logger.info("4/4 Predicting the test split with reflection averaging (validation: the run's own evaluation)")
    report.predictions = output_dir / "preds.csv"
    test_rows = {}
    infer([s.path for s in splits["test"]], report.run_dir, report.predictions, cache_dir=cache_dir, workers=0,
          device=device, precision=precision, on_row=lambda row: test_rows.update({row["path"]: row}), overwrite=True)
    baseline = baseline_scores(labelled(items, "train"), splits, cache)
    model = {"validation": run_validation_scores(report.run_dir), "test": score_rows(splits["test"], test_rows)}
    for name in splits:
        report.scores[f"cov3d {name}"], report.scores[f"baseline {name}"] = model[name], baseline[name]
    step_done("infer")
    check_beats_baseline(report)
    return report


def run_validation_scores(run_dir: Path) -> dict[str, float]:
    """The validation scores of the run's kept weights, each scan averaged with its reflection: the
    training's own evaluation after the fit (``tta_scores`` in summary.json, the predictions `cov3d infer`
    makes, up to rounding in bf16; ``cov3d.training.evaluation``), so the demo does not predict validation
    a second time. Severity is NaN without graded validation scans."""
    scores = json.loads((run_dir / SUMMARY_FILE).read_text())["tta_scores"]
    return {"presence_f1": scores["presence_f1"], "severity_f1": scores.get("severity_f1", float("nan"))}


def workload_note(settings: DemoSettings, precision: str) -> str:
    """' (the workload of fp32 (...); the other: ...)' when the demo trains its own workload, else ''."""
    workload = demo_workload(precision)
    if (settings.scans, settings.shape.dims, settings.epochs) != (workload.scans, workload.shape.dims, workload.epochs):
        return ""
    (used,) = [name for name, each in DEMO_WORKLOADS.items() if each == workload]
    others = "; ".join(f"{name}: {each}" for name, each in DEMO_WORKLOADS.items() if each != workload)
    return f" (the workload of {used}, to take under 10 minutes on 2 cores; {others})"


def check_beats_baseline(report: DemoReport) -> None:
    """Refuse a demo whose model is no better than the mean-intensity baseline on validation presence F1."""
    model, baseline = report.scores["cov3d validation"]["presence_f1"], report.scores["baseline validation"]["presence_f1"]
    if not model > baseline:
        raise BaselineNotBeaten(
            f"The demo's model did not beat the mean-intensity baseline on validation presence macro F1 "
            f"({model:.3f} vs {baseline:.3f}), so training failed; see {report.run_dir / 'metrics.csv'} and "
            "try again with `precision=fp32`.",
            report,
        )

