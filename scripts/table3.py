"""The paper's Table 3 (28 hyperparameter settings) as runnable experiments.

    python scripts/table3.py list                                   # the settings and the paper's scores
    python scripts/table3.py commands --directory DATA > jobs.txt   # one `cov3d train` line per run (all 28)
    python scripts/table3.py commands 1-6 14 --directory DATA       # a subset
    python scripts/table3.py run 14 --directory DATA                # run one setting here (e.g. a job-array task)
    python scripts/table3.py run 14 -d DATA --extra="--epochs 1"    # extra `cov3d train` options override the row's
    python scripts/table3.py commands --warp --output-root outputs/warped -d DATA   # with the original's warp
    python scripts/table3.py collect                                # our scores beside the paper's, in its layout
    python scripts/table3.py submission DATA/test                   # the paper's five submissions per task

Every command pins the choices of the original code at the paper's time where the paper is silent
(max pooling, no final bias, presence terms averaged over the batch: `ORIGINAL_CHOICES`); `--warp` adds
the original's cubic coordinate warp (f = 0.5), which the paper does not describe (off by default).
Runs go to OUTPUT_ROOT/table3-<ID> (default outputs/table3-<ID>); `collect` reads their summary.json.
`--extra` is appended to every `cov3d train` command (the last value of an option wins).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from cov3d.settings import ORIGINAL_WARP

DEFAULT_OUTPUT_ROOT = Path("outputs")
MISSING = "–"  # the paper's mark for a task a setting does not train (lambda = 0 or 1)
ORIGINAL_CHOICES = ("--pool", "max", "--no-final-bias", "--presence-averaging", "batch")
"""Where the paper is silent, the original code's choices at the paper's time (also cov3d's defaults)."""
ORIGINAL_WARP_OPTION = ("--warp", str(ORIGINAL_WARP))
"""The original code's cubic coordinate warp, on by default there; not in the paper."""
SUBMISSION_MODELS = 4
"""The paper submitted, per task, its four best models and the ensemble of the four."""


@dataclass(frozen=True)
class Setting:
    """One row of Table 3: its hyperparameters and the paper's validation macro F1 for tasks 1 and 2."""

    id: int
    depth: int
    width: int
    reflect: bool
    severity_factor: float
    epochs: int
    presence_smoothing: float
    severity_smoothing: float
    paper_task1: float | None
    paper_task2: float | None


# Table 3 of the paper, in its order (descending task 1 macro F1):
# ID, depth, width (= height), reflection, lambda, epochs, eps_p, eps_s, task 1 F1, task 2 F1.
TABLE3 = tuple(Setting(*row) for row in (
    (1, 160, 320, True, 0.1, 40, 0.1, 0.0, 0.9476, 0.4764),
    (2, 160, 320, True, 0.1, 50, 0.1, 0.0, 0.9412, 0.4417),
    (3, 160, 320, False, 0.1, 30, 0.1, 0.1, 0.9394, 0.4508),
    (4, 160, 320, True, 0.0, 40, 0.0, 0.1, 0.9372, None),
    (5, 160, 320, True, 0.5, 30, 0.1, 0.1, 0.9372, 0.5952),
    (6, 160, 320, True, 0.9, 50, 0.1, 0.0, 0.9371, 0.6369),
    (7, 128, 256, True, 0.1, 40, 0.1, 0.0, 0.9351, 0.4424),
    (8, 128, 256, True, 0.1, 50, 0.1, 0.0, 0.9328, 0.4812),
    (9, 128, 256, True, 0.1, 40, 0.0, 0.0, 0.9311, 0.388),
    (10, 160, 320, True, 0.1, 30, 0.1, 0.1, 0.9287, 0.4153),
    (11, 160, 320, True, 0.9, 40, 0.1, 0.0, 0.9277, 0.6623),
    (12, 64, 128, True, 0.1, 40, 0.1, 0.1, 0.9268, 0.3988),
    (13, 128, 256, False, 0.5, 30, 0.1, 0.1, 0.9264, 0.5909),
    (14, 128, 256, True, 0.9, 40, 0.1, 0.0, 0.9256, 0.7546),
    (15, 128, 256, False, 0.1, 30, 0.1, 0.1, 0.9249, 0.4416),
    (16, 160, 320, True, 0.9, 40, 0.1, 0.1, 0.9237, 0.6766),
    (17, 128, 256, True, 0.0, 40, 0.0, 0.1, 0.9226, None),
    (18, 64, 128, True, 0.2, 30, 0.1, 0.0, 0.9222, 0.4745),
    (19, 64, 128, True, 0.1, 50, 0.1, 0.0, 0.9204, 0.4725),
    (20, 64, 128, True, 0.0, 40, 0.1, 0.0, 0.9183, None),
    (21, 64, 128, True, 0.1, 40, 0.1, 0.0, 0.9183, 0.4376),
    (22, 64, 128, True, 0.0, 40, 0.0, 0.1, 0.9183, None),
    (23, 128, 256, True, 0.1, 30, 0.1, 0.1, 0.9167, 0.4354),
    (24, 64, 128, False, 0.1, 30, 0.1, 0.0, 0.9093, 0.3873),
    (25, 64, 128, True, 0.9, 40, 0.1, 0.0, 0.9062, 0.6754),
    (26, 64, 128, False, 0.5, 30, 0.1, 0.0, 0.8973, 0.6143),
    (27, 128, 256, True, 1.0, 40, 0.0, 0.0, None, 0.6712),
    (28, 64, 128, True, 1.0, 40, 0.0, 0.0, None, 0.6811),
))
BY_ID = {setting.id: setting for setting in TABLE3}

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
DirectoryOption = typer.Option("DATA", "--directory", "-d", help="Dataset folder given to every run.")
OutputRootOption = typer.Option(DEFAULT_OUTPUT_ROOT, "--output-root", help="Runs go to OUTPUT_ROOT/table3-<ID>.")
ExtraOption = typer.Option("", "--extra", help='More `cov3d train` options for every run, e.g. --extra="--seed 1 --wandb".')
WarpOption = typer.Option(False, "--warp/--no-warp", help="Add the original code's cubic coordinate warp (--warp 0.5) to every run.")


def parse_ids(specs: list[str] | None) -> list[int]:
    """'3', '1-6' and '1,4' style specs -> sorted setting IDs; none means all 28."""
    if not specs:
        return [setting.id for setting in TABLE3]
    ids: set[int] = set()
    for part in (p for spec in specs for p in spec.split(",") if p):
        first, _, last = part.partition("-")
        try:
            ids.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise typer.BadParameter(f"'{part}' is not an ID or a range like 1-6") from None
    unknown = sorted(ids - set(BY_ID))
    if unknown:
        raise typer.BadParameter(f"Table 3 has IDs 1-{len(TABLE3)}; no {unknown[0]}")
    return sorted(ids)


def call_cov3d(arguments: list[str]) -> None:
    """Run a `cov3d` command in this process; exit with its status if it fails."""
    from cov3d.cli import app as cov3d_app

    try:
        status = cov3d_app(arguments, standalone_mode=False)  # returns the status of a one-line error
    except SystemExit as exit_:
        status = exit_.code
    if status:
        sys.exit(status)


def run_dir(setting: Setting, output_root: Path) -> Path:
    return output_root / f"table3-{setting.id}"


def train_arguments(
    setting: Setting, directory: Path, output_root: Path, extra: list[str] = (), *, warp: bool = False
) -> list[str]:
    """The `cov3d train` arguments (without the program name) for one setting, the original code's
    choices (and its warp with ``warp``), then `extra`."""
    return [
        "train", "--directory", str(directory), "--output-dir", str(run_dir(setting, output_root)),
        "--depth", str(setting.depth), "--width", str(setting.width),
        "--reflect" if setting.reflect else "--no-reflect",
        "--severity-factor", str(setting.severity_factor), "--epochs", str(setting.epochs),
        "--presence-smoothing", str(setting.presence_smoothing),
        "--severity-smoothing", str(setting.severity_smoothing), *ORIGINAL_CHOICES,
        *(ORIGINAL_WARP_OPTION if warp else ()), *extra,
    ]


def score(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


@app.command("list")
def list_settings() -> None:
    """Print the 28 settings and the paper's scores."""
    typer.echo("ID  depth  width  reflect  lambda  epochs  eps_p  eps_s  task1   task2")
    for s in TABLE3:
        typer.echo(f"{s.id:<3} {s.depth:<6} {s.width:<6} {'yes' if s.reflect else 'no':<8} {s.severity_factor:<7} "
                   f"{s.epochs:<7} {s.presence_smoothing:<6} {s.severity_smoothing:<6} "
                   f"{score(s.paper_task1):<7} {score(s.paper_task2)}")


@app.command()
def commands(
    ids: Optional[list[str]] = typer.Argument(None, help="IDs or ranges (1-6); default all."),
    directory: Path = DirectoryOption,
    output_root: Path = OutputRootOption,
    extra: str = ExtraOption,
    warp: bool = WarpOption,
) -> None:
    """Print one `cov3d train` command per setting (one line per job-array task)."""
    for setting_id in parse_ids(ids):
        arguments = train_arguments(BY_ID[setting_id], directory, output_root, shlex.split(extra), warp=warp)
        typer.echo(shlex.join(["cov3d", *arguments]))


@app.command()
def run(
    setting_id: int = typer.Argument(..., help="Table 3 ID (1-28), e.g. $SLURM_ARRAY_TASK_ID."),
    directory: Path = DirectoryOption,
    output_root: Path = OutputRootOption,
    extra: str = ExtraOption,
    warp: bool = WarpOption,
) -> None:
    """Train one setting in this process (through the `cov3d train` command line)."""
    (setting_id,) = parse_ids([str(setting_id)])
    call_cov3d(train_arguments(BY_ID[setting_id], directory, output_root, shlex.split(extra), warp=warp))


@dataclass(frozen=True)
class Result:
    """A finished run of a setting: the best-epoch validation F1 of each task and the F1 of the kept
    weights with reflection averaging (``tta_scores``; None for runs made before it was recorded)."""

    setting: Setting
    run_dir: Path
    best: dict[str, float]
    tta: dict[str, float]

    def task1(self, tta: bool = False) -> float | None:
        return None if self.setting.severity_factor >= 1 else (self.tta if tta else self.best).get("presence_f1")

    def task2(self, tta: bool = False) -> float | None:
        return None if self.setting.severity_factor <= 0 else (self.tta if tta else self.best).get("severity_f1")


def collected_results(output_root: Path) -> list[Result]:
    """The settings with a finished run (a summary.json), best task 1 F1 first."""
    results = []
    for setting in TABLE3:
        summary_path = run_dir(setting, output_root) / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            results.append(Result(setting, run_dir(setting, output_root), summary["best_scores"],
                                  summary.get("tta_scores", {})))
    return sorted(results, key=lambda r: (r.task1() is None, -(r.task1() or 0.0), r.setting.id))


def collected_rows(output_root: Path) -> list[tuple[Setting, float | None, float | None]]:
    """(setting, our best-epoch task 1 F1, task 2 F1) for the settings with a finished run, best task 1 first."""
    return [(r.setting, r.task1(), r.task2()) for r in collected_results(output_root)]


@app.command()
def collect(output_root: Path = OutputRootOption) -> None:
    """Print a Markdown table of the finished runs in the paper's layout, with the paper's scores beside ours.

    Per task: the best validation F1 over the epochs (what the paper's Table 3 reports) and the F1 of
    the weights kept at that epoch with reflection averaging (what `cov3d infer` predicts with them).
    """
    typer.echo("| ID | Depth | Width/Height | Reflection | λ | Epochs | ε_p | ε_s | Task 1 macro F1 | Task 2 macro F1 "
               "| Task 1 kept + TTA | Task 2 kept + TTA | paper task 1 | paper task 2 |")
    typer.echo("|" + "---|" * 14)
    for r in collected_results(output_root):
        s = r.setting
        typer.echo(
            f"| {s.id} | {s.depth} | {s.width} | {'Yes' if s.reflect else 'No'} | {s.severity_factor} | {s.epochs} "
            f"| {s.presence_smoothing} | {s.severity_smoothing} | {score(r.task1())} | {score(r.task2())} "
            f"| {score(r.task1(tta=True))} | {score(r.task2(tta=True))} "
            f"| {score(s.paper_task1)} | {score(s.paper_task2)} |"
        )


def ranked(results: list[Result], task: int, tta: bool) -> list[Result]:
    """The runs that train ``task`` (1 or 2), best validation F1 first (ties: lower ID)."""
    def value(result: Result) -> float | None:
        return result.task1(tta) if task == 1 else result.task2(tta)

    scored = [r for r in results if value(r) is not None]
    return sorted(scored, key=lambda r: (-value(r), r.setting.id))


def submission_plan(results: list[Result], tta: bool = False) -> list[tuple[str, list[Result], list[Result]]]:
    """The paper's submissions: (name, presence runs, severity runs) for the k-th best model of each
    task, k = 1..4, then the ensemble of the four (fewer when fewer runs are finished)."""
    presence = ranked(results, 1, tta)[:SUBMISSION_MODELS]
    severity = ranked(results, 2, tta)[:SUBMISSION_MODELS]
    if not presence or not severity:
        raise typer.BadParameter("the grid needs at least one finished run for each task (see `collect`)")
    plan = [(f"submission-{k + 1}", [presence[min(k, len(presence) - 1)]], [severity[min(k, len(severity) - 1)]])
            for k in range(SUBMISSION_MODELS)]
    return plan + [(f"submission-{SUBMISSION_MODELS + 1}-ensemble", presence, severity)]


def infer_arguments(scans: list[Path], presence: list[Result], severity: list[Result], folder: Path,
                    task: str | None = None, extra: list[str] = ()) -> list[str]:
    """`cov3d infer` arguments for one submission (``task``: only "presence" or "severity" models)."""
    models = []
    if task in (None, "presence"):
        models += [word for r in presence for word in ("--presence-model", str(r.run_dir))]
    if task in (None, "severity"):
        models += [word for r in severity for word in ("--severity-model", str(r.run_dir))]
    return ["infer", *map(str, scans), *models, "--output", str(folder / "predictions.csv"),
            "--submission-dir", str(folder), *extra]


@app.command()
def submission(
    test: list[Path] = typer.Argument(..., help="The test scans (or folders of them) for both tasks, or for task 1 with --severity-test."),
    severity_test: Optional[list[Path]] = typer.Option(None, "--severity-test", help="Separate test scans for task 2 (severity); task 1 then uses TEST only."),
    output_root: Path = OutputRootOption,
    submission_root: Path = typer.Option(Path("submissions"), "--submission-root", help="Each submission goes to SUBMISSION_ROOT/<name>/."),
    tta_rank: bool = typer.Option(False, "--rank-by-tta/--rank-by-epoch", help="Rank runs by the kept weights' F1 with reflection averaging instead of the best-epoch F1 (the paper's Table 3)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the `cov3d infer` commands."),
    extra: str = typer.Option("", "--extra", help='More `cov3d infer` options, e.g. --extra="--device cuda".'),
) -> None:
    """The paper's submissions from a finished grid: per task, each of its four best runs and their ensemble.

    Submission k (1-4) predicts presence with the k-th best run on task 1 and severity with the k-th best
    run on task 2; submission 5 averages the four of each. One `cov3d infer` per submission writes
    predictions.csv and the competition files into SUBMISSION_ROOT/<name>/ (with --severity-test: one per
    task, into <name>/task1/ and <name>/task2/). `models.json` there lists the runs used.
    """
    plan = submission_plan(collected_results(output_root), tta_rank)
    extra_words = shlex.split(extra)
    for name, presence, severity in plan:
        folder = submission_root / name
        if severity_test:
            commands = [infer_arguments(test, presence, severity, folder / "task1", "presence", extra_words),
                        infer_arguments(severity_test, presence, severity, folder / "task2", "severity", extra_words)]
        else:
            commands = [infer_arguments(test, presence, severity, folder, None, extra_words)]
        for arguments in commands:
            typer.echo(shlex.join(["cov3d", *arguments]))
            if not dry_run:
                Path(arguments[arguments.index("--submission-dir") + 1]).mkdir(parents=True, exist_ok=True)
                call_cov3d(arguments)
        if not dry_run:
            record = {"presence": [r.setting.id for r in presence], "severity": [r.setting.id for r in severity],
                      "ranked_by": "kept weights with TTA" if tta_rank else "best epoch"}
            (folder / "models.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    app()
