"""The paper's Table 3 (28 hyperparameter settings) as runnable experiments.

    python scripts/table3.py list                                   # the settings and the paper's scores
    python scripts/table3.py commands --directory DATA > jobs.txt   # one `cov3d train` line per run (all 28)
    python scripts/table3.py commands 1-6 14 --directory DATA       # a subset
    python scripts/table3.py run 14 --directory DATA                # run one setting here (e.g. a job-array task)
    python scripts/table3.py run 14 -d DATA --extra="--epochs 1"    # extra `cov3d train` options override the row's
    python scripts/table3.py collect                                # our scores beside the paper's, in its layout

Runs go to OUTPUT_ROOT/table3-<ID> (default outputs/table3-<ID>); `collect` reads their summary.json.
`--extra` is appended to every `cov3d train` command (the last value of an option wins).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

DEFAULT_OUTPUT_ROOT = Path("outputs")
MISSING = "–"  # the paper's mark for a task a setting does not train (lambda = 0 or 1)


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


def run_dir(setting: Setting, output_root: Path) -> Path:
    return output_root / f"table3-{setting.id}"


def train_arguments(setting: Setting, directory: Path, output_root: Path, extra: list[str] = ()) -> list[str]:
    """The `cov3d train` arguments (without the program name) for one setting, then `extra`."""
    return [
        "train", "--directory", str(directory), "--output-dir", str(run_dir(setting, output_root)),
        "--depth", str(setting.depth), "--width", str(setting.width),
        "--reflect" if setting.reflect else "--no-reflect",
        "--severity-factor", str(setting.severity_factor), "--epochs", str(setting.epochs),
        "--presence-smoothing", str(setting.presence_smoothing),
        "--severity-smoothing", str(setting.severity_smoothing), *extra,
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
) -> None:
    """Print one `cov3d train` command per setting (one line per job-array task)."""
    for setting_id in parse_ids(ids):
        arguments = train_arguments(BY_ID[setting_id], directory, output_root, shlex.split(extra))
        typer.echo(shlex.join(["cov3d", *arguments]))


@app.command()
def run(
    setting_id: int = typer.Argument(..., help="Table 3 ID (1-28), e.g. $SLURM_ARRAY_TASK_ID."),
    directory: Path = DirectoryOption,
    output_root: Path = OutputRootOption,
    extra: str = ExtraOption,
) -> None:
    """Train one setting in this process (through the `cov3d train` command line)."""
    from cov3d.cli import app as cov3d_app

    (setting_id,) = parse_ids([str(setting_id)])
    arguments = train_arguments(BY_ID[setting_id], directory, output_root, shlex.split(extra))
    cov3d_app(arguments, standalone_mode=False)


def collected_rows(output_root: Path) -> list[tuple[Setting, float | None, float | None]]:
    """(setting, our task 1 F1, our task 2 F1) for the settings with a finished run, best task 1 first."""
    rows = []
    for setting in TABLE3:
        summary_path = run_dir(setting, output_root) / "summary.json"
        if summary_path.is_file():
            best = json.loads(summary_path.read_text())["best_scores"]
            rows.append((setting, best.get("presence_f1"), best.get("severity_f1")))
    return sorted(rows, key=lambda row: (row[1] is None, -(row[1] or 0.0), row[0].id))


@app.command()
def collect(output_root: Path = OutputRootOption) -> None:
    """Print a Markdown table of the finished runs in the paper's layout, with the paper's scores beside ours."""
    typer.echo("| ID | Depth | Width/Height | Reflection | λ | Epochs | ε_p | ε_s | Task 1 macro F1 | Task 2 macro F1 "
               "| paper task 1 | paper task 2 |")
    typer.echo("|" + "---|" * 12)
    for s, task1, task2 in collected_rows(output_root):
        typer.echo(
            f"| {s.id} | {s.depth} | {s.width} | {'Yes' if s.reflect else 'No'} | {s.severity_factor} | {s.epochs} "
            f"| {s.presence_smoothing} | {s.severity_smoothing} "
            f"| {score(task1 if s.severity_factor < 1 else None)} | {score(task2 if s.severity_factor > 0 else None)} "
            f"| {score(s.paper_task1)} | {score(s.paper_task2)} |"
        )


if __name__ == "__main__":
    app()
