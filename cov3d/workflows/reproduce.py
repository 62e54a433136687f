"""The paper's Table 3 (28 hyperparameter settings) as runnable experiments (``cov3d reproduce``).

Every run is one ``cov3d train`` command that pins the choices of the original code at the paper's
time where the paper is silent (max pooling, no final bias, presence terms averaged over the batch:
``ORIGINAL_CHOICES``), optionally with the original's cubic coordinate warp (f = 0.5), which the
paper does not describe. With the ``original`` recipe (``cov3d.recipes``) every run takes the original
code's defaults instead where the row does not set them, so that the grid can be run both ways. Runs go to OUTPUT_ROOT/table3-<ID>; ``collected_results`` reads their
summary.json, and ``submission_plan`` picks the paper's submissions from them: per task, each of its
four best runs and the ensemble of the four.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cov3d.errors import Cov3dError
from cov3d.recipes import GRADED_ONLY, ORIGINAL_WARP, PAPER, recipe_defaults
from cov3d.runfiles import SUMMARY_FILE, TASK_METRICS

DEFAULT_OUTPUT_ROOT = Path("outputs")
MISSING = "–"
"""The paper's mark for a task a setting does not train (lambda = 0 or 1)."""
ORIGINAL_CHOICES = ("--pool", "max", "--no-final-bias", "--presence-averaging", "batch")
"""Where the paper is silent, the original code's choices at the paper's time (also cov3d's defaults)."""
ORIGINAL_WARP_OPTION = ("--warp", str(ORIGINAL_WARP))
"""The original code's cubic coordinate warp, on by default there; not in the paper."""
NO_WARP_OPTION = ("--warp", "0")
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
            raise Cov3dError(f"'{part}' is not a Table 3 ID or a range like 1-6.") from None
    unknown = sorted(ids - set(BY_ID))
    if unknown:
        raise Cov3dError(f"Table 3 has IDs 1-{len(TABLE3)}; there is no {unknown[0]}.")
    return sorted(ids)


def run_dir(setting: Setting, output_root: Path) -> Path:
    return output_root / f"table3-{setting.id}"


def train_arguments(
    setting: Setting, directory: Path, output_root: Path, extra: list[str] = (), *, warp: bool | None = None,
    recipe: str = PAPER,
) -> list[str]:
    """The `cov3d train` arguments (without the program name) for one setting under ``recipe``, the
    original code's choices, the original's warp (``warp`` True), none (False) or the recipe's (None),
    then `extra`. A recipe with the graded-only severity loss (the original's) gets no eps_s: that loss
    has no smoothing (the original code ignored its eps_s)."""
    smoothing = ("--severity-smoothing", str(setting.severity_smoothing))
    graded_only = recipe_defaults(recipe).get("severity_loss") == GRADED_ONLY
    return [
        "train", "--recipe", recipe, "--directory", str(directory), "--output-dir", str(run_dir(setting, output_root)),
        "--depth", str(setting.depth), "--width", str(setting.width),
        "--reflect" if setting.reflect else "--no-reflect",
        "--severity-factor", str(setting.severity_factor), "--epochs", str(setting.epochs),
        "--presence-smoothing", str(setting.presence_smoothing), *(() if graded_only else smoothing), *ORIGINAL_CHOICES,
        *({True: ORIGINAL_WARP_OPTION, False: NO_WARP_OPTION}.get(warp, ())), *extra,
    ]


def score(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class Result:
    """A finished run of a setting: the best-epoch validation F1 of each task and the F1 of the kept
    weights with reflection averaging (``tta_scores``; None for runs made before it was recorded)."""

    setting: Setting
    run_dir: Path
    best: dict[str, float]
    tta: dict[str, float]

    def task1(self, tta: bool = False) -> float | None:
        return None if self.setting.severity_factor >= 1 else (self.tta if tta else self.best).get(TASK_METRICS["presence"])

    def task2(self, tta: bool = False) -> float | None:
        return None if self.setting.severity_factor <= 0 else (self.tta if tta else self.best).get(TASK_METRICS["severity"])


def collected_results(output_root: Path) -> list[Result]:
    """The settings with a finished run (a summary.json), best task 1 F1 first."""
    results = []
    for setting in TABLE3:
        summary_path = run_dir(setting, output_root) / SUMMARY_FILE
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            results.append(Result(setting, run_dir(setting, output_root), summary["best_scores"],
                                  summary.get("tta_scores", {})))
    return sorted(results, key=lambda r: (r.task1() is None, -(r.task1() or 0.0), r.setting.id))


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
        raise Cov3dError("The submissions need at least one finished run for each task (see 'cov3d reproduce collect').")
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
