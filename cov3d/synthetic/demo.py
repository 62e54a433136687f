"""`cov3d demo`: generate a synthetic dataset, preprocess, train, infer and score, on a CPU in minutes.

The demo keeps the paper's method (loss, schedule, reflection, checkpoints) but shrinks the problem so
that it fits a laptop: fewer and thinner synthetic scans, small volumes, no Kinetics weights (they
cannot be assumed offline), a larger batch and learning rate to train from scratch in a few epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sklearn.linear_model import LogisticRegression

from cov3d.dataset.layout import SEVERITY_CATEGORIES, SEVERITY_LABELS, read_answer_key
from cov3d.dataset.scans import find_scans
from cov3d.errors import Cov3dError
from cov3d.inference.infer import infer
from cov3d.model.metrics import macro_f1
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import preprocess_many
from cov3d.synthetic.generator import TEST_FOLDER, TEST_LABELS_CSV, generate_dataset
from cov3d.training.data import TrainingItem, collect_items
from cov3d.training.train import TrainSettings, train

SEVERITY_CODES = list(SEVERITY_CATEGORIES)


@dataclass
class DemoSettings:
    """The demo's dataset and training sizes (chosen to finish in minutes on 2 CPU cores)."""

    scans: int = 240
    seed: int = 0
    slice_size: int = 128
    depth_scale: float = 0.1
    annotated_fraction: float = 0.75
    depth: int = 16
    width: int = 64
    epochs: int = 16
    batch_size: int = 4
    learning_rate: float = 3e-4
    severity_factor: float = 0.5
    penultimate: int = 128
    dropout: float = 0.2

    def train_settings(self) -> TrainSettings:
        return TrainSettings(
            depth=self.depth, height=self.width, width=self.width, epochs=self.epochs,
            batch_size=self.batch_size, learning_rate=self.learning_rate,
            severity_factor=self.severity_factor, penultimate=self.penultimate, dropout=self.dropout,
            seed=self.seed,
        )


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
    """Generate -> preprocess -> train -> infer -> score; everything is written under `output_dir`."""
    console = console or Console()
    report = DemoReport()
    data_dir, cache_dir = output_dir / "data", output_dir / "cache"
    clock = time.perf_counter()

    def step_done(name: str) -> None:
        nonlocal clock
        report.seconds[name] = time.perf_counter() - clock
        console.print(f"[green]✓[/green] {name} ({report.seconds[name]:.0f} s)")
        clock = time.perf_counter()

    console.rule("1/4 Generating synthetic chest CT scans")
    with Progress(console=console) as bar:
        task = bar.add_task("Generating", total=settings.scans)
        generate_dataset(
            data_dir, scans=settings.scans, seed=settings.seed, slice_size=settings.slice_size,
            depth_scale=settings.depth_scale, annotated_fraction=settings.annotated_fraction,
            overwrite=True, masks=True,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    step_done("generate")

    console.rule(f"2/4 Preprocessing to {settings.depth}x{settings.width}x{settings.width}")
    items = collect_items(data_dir)
    splits = {"validation": labelled(items, "validation"), "test": labelled_test_split(data_dir)}
    cache = VolumeCache(cache_dir, settings.depth, settings.width, settings.width)
    preprocess_many([i.path for i in items] + [s.path for s in splits["test"]], cache, workers=workers)
    step_done("preprocess")

    console.rule("3/4 Training (from scratch, 1cycle)")
    report.run_dir = output_dir / "run"
    train(data_dir, report.run_dir, settings.train_settings(), cache_dir=cache_dir, pretrained=False,
          device=device, precision=precision, workers=workers)
    step_done("train")

    console.rule("4/4 Inference with reflection averaging")
    report.predictions = output_dir / "preds.csv"
    outputs = {"test": report.predictions, "validation": output_dir / "validation-preds.csv"}
    by_path = {}
    for name, split_scans in splits.items():
        infer([s.path for s in split_scans], report.run_dir, outputs[name], cache_dir=cache_dir,
              device=device, precision=precision, on_row=lambda row: by_path.update({row["path"]: row}))
    baseline = baseline_scores(labelled(items, "train"), splits, cache)
    for name, split_scans in splits.items():
        report.scores[f"cov3d {name}"] = score_rows(split_scans, by_path)
        report.scores[f"baseline {name}"] = baseline[name]
    step_done("infer")
    print_report(report, console)
    check_beats_baseline(report)
    return report


def check_beats_baseline(report: DemoReport) -> None:
    """Refuse a demo whose model is no better than the mean-intensity baseline on validation presence F1."""
    model, baseline = report.scores["cov3d validation"]["presence_f1"], report.scores["baseline validation"]["presence_f1"]
    if not model > baseline:
        raise Cov3dError(
            f"The demo's model did not beat the mean-intensity baseline on validation presence macro F1 "
            f"({model:.3f} vs {baseline:.3f}), so training failed; see {report.run_dir / 'metrics.csv'} and "
            "try again with --precision fp32."
        )


def print_report(report: DemoReport, console: Console) -> None:
    """The score table (macro F1 per task and split) and the time of each step."""
    table = Table(title="Macro F1 on the synthetic data")
    table.add_column("model / split")
    table.add_column("presence", justify="right")
    table.add_column("severity", justify="right")
    for name, scores in report.scores.items():
        table.add_row(name, f"{scores['presence_f1']:.3f}", f"{scores['severity_f1']:.3f}")
    console.print(table)
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.seconds.items())
    console.print(f"Time: {steps}; total {sum(report.seconds.values()):.0f} s")
    console.print(f"Run: {report.run_dir}   Test predictions: {report.predictions}")
