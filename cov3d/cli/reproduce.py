"""`cov3d reproduce`: the paper's Table 3 grid (``cov3d.workflows.reproduce``) planned, run one setting
at a time, collected in the paper's layout, and turned into the paper's submissions."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer

from cov3d.cli.common import app, user_errors
from cov3d.recipes import PAPER, RECIPES
from cov3d.workflows.reproduce import (
    BY_ID,
    DEFAULT_OUTPUT_ROOT,
    TABLE3,
    collected_results,
    infer_arguments,
    parse_ids,
    score,
    submission_plan,
    train_arguments,
)

reproduce_app = typer.Typer(
    help="The paper's Table 3: 28 settings as `cov3d train` runs, their scores beside the paper's, and its submissions.",
    no_args_is_help=True,
)
app.add_typer(reproduce_app, name="reproduce")

DirectoryOption = typer.Option(Path("DATA"), "--directory", "-d", help="Dataset folder given to every run.")
OutputRootOption = typer.Option(DEFAULT_OUTPUT_ROOT, "--output-root", help="Runs go to OUTPUT_ROOT/table3-<ID>.")
ExtraOption = typer.Option("", "--extra", help='More `cov3d train` options for every run, e.g. --extra="--seed 1 --wandb" (the last value of an option wins).')
WarpOption = typer.Option(None, "--warp/--no-warp", help=(
    "Add the original code's cubic coordinate warp (--warp 0.5) to every run, or --warp 0. Default: the recipe's."))
RecipeOption = typer.Option(PAPER, "--recipe", help=(
    f"The `cov3d train` recipe of every run: {' or '.join(RECIPES)} (the original code's defaults where the row sets "
    "nothing; its graded-only severity loss takes no eps_s). Give each recipe its own --output-root to compare them."))


def call_cov3d(arguments: list[str]) -> None:
    """Run a `cov3d` command in this process; exit with its status if it fails."""
    try:
        status = app(arguments, standalone_mode=False)  # returns the status of a one-line error
    except SystemExit as exit_:
        status = exit_.code
    if status:
        raise typer.Exit(status)


@reproduce_app.command("list")
def list_command() -> None:
    """Print the 28 settings and the paper's scores."""
    typer.echo("ID  depth  width  reflect  lambda  epochs  eps_p  eps_s  task1   task2")
    for s in TABLE3:
        typer.echo(f"{s.id:<3} {s.depth:<6} {s.width:<6} {'yes' if s.reflect else 'no':<8} {s.severity_factor:<7} "
                   f"{s.epochs:<7} {s.presence_smoothing:<6} {s.severity_smoothing:<6} "
                   f"{score(s.paper_task1):<7} {score(s.paper_task2)}")


@reproduce_app.command("plan")
@user_errors
def plan_command(
    ids: Optional[list[str]] = typer.Argument(None, help="IDs or ranges (1-6, 3,4); default all."),
    directory: Path = DirectoryOption,
    output_root: Path = OutputRootOption,
    extra: str = ExtraOption,
    warp: Optional[bool] = WarpOption,
    recipe: str = RecipeOption,
) -> None:
    """Print one `cov3d train` command per setting (one line per job-array task)."""
    for setting_id in parse_ids(ids):
        arguments = train_arguments(BY_ID[setting_id], directory, output_root, shlex.split(extra), warp=warp, recipe=recipe)
        typer.echo(shlex.join(["cov3d", *arguments]))


@reproduce_app.command("run")
@user_errors
def run_command(
    setting_id: int = typer.Argument(..., help="Table 3 ID (1-28), e.g. $SLURM_ARRAY_TASK_ID."),
    directory: Path = DirectoryOption,
    output_root: Path = OutputRootOption,
    extra: str = ExtraOption,
    warp: Optional[bool] = WarpOption,
    recipe: str = RecipeOption,
) -> None:
    """Train one setting in this process (through the `cov3d train` command line)."""
    (setting_id,) = parse_ids([str(setting_id)])
    call_cov3d(train_arguments(BY_ID[setting_id], directory, output_root, shlex.split(extra), warp=warp, recipe=recipe))


@reproduce_app.command("collect")
@user_errors
def collect_command(output_root: Path = OutputRootOption) -> None:
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


@reproduce_app.command("submission")
@user_errors
def submission_command(
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
