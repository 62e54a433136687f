"""cov3d reproduce: the paper's 28 settings, commands that the `cov3d train` CLI accepts, a tiny run, collect, submissions."""

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cov3d.cli import app as cov3d_app
from cov3d.synthetic.generator import generate_dataset
from cov3d.workflows import reproduce as table3

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT.parent / "shared" / "spec" / "cov3d-paper.md"


def invoke(*arguments: str):
    """``cov3d reproduce ARGUMENTS``."""
    return CliRunner().invoke(cov3d_app, ["reproduce", *arguments])


def parse_train(arguments: list[str]) -> dict:
    """Parse (and validate) `cov3d train` arguments with the real CLI, without running anything."""
    group = typer.main.get_command(cov3d_app)
    assert arguments[0] == "train"
    return group.get_command(None, "train").make_context("train", arguments[1:]).params


def test_28_settings_with_ids_1_to_28():
    assert [s.id for s in table3.TABLE3] == list(range(1, 29))
    best = table3.BY_ID[1]
    assert (best.depth, best.width, best.reflect, best.severity_factor, best.epochs) == (160, 320, True, 0.1, 40)
    assert (best.presence_smoothing, best.severity_smoothing, best.paper_task1) == (0.1, 0.0, 0.9476)
    assert table3.BY_ID[14].paper_task2 == 0.7546
    for s in table3.TABLE3:  # the paper leaves out the task a setting does not train
        assert (s.paper_task2 is None) == (s.severity_factor == 0) and (s.paper_task1 is None) == (s.severity_factor == 1)


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper is not beside this checkout")
def test_settings_match_the_paper_text():
    rows = re.findall(r"^(\d+)\t(\d+)\t(\d+)\t(Yes|No)\t([\d.]+)\t(\d+)\t([\d.]+)\t([\d.]+)\t", PAPER.read_text(), re.M)
    assert len(rows) == 28
    for row in rows:
        s = table3.BY_ID[int(row[0])]
        assert (s.depth, s.width, s.reflect, s.epochs) == (int(row[1]), int(row[2]), row[3] == "Yes", int(row[5]))
        assert (s.severity_factor, s.presence_smoothing, s.severity_smoothing) == tuple(map(float, row[4:5] + row[6:8]))


def test_every_command_parses_with_the_row_settings():
    result = invoke("plan", "--directory", "DATA", "--output-root", "out")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 28
    for line, setting in zip(lines, table3.TABLE3):
        words = shlex.split(line)
        assert words[0] == "cov3d"
        params = parse_train(words[1:])
        assert params["output_dir"] == Path(f"out/table3-{setting.id}")
        assert (params["depth"], params["width"], params["reflect"], params["epochs"]) == (
            setting.depth, setting.width, setting.reflect, setting.epochs)
        assert (params["severity_factor"], params["presence_smoothing"], params["severity_smoothing"]) == (
            setting.severity_factor, setting.presence_smoothing, setting.severity_smoothing)
        # where the paper is silent: the original code's choices, pinned; the paper recipe's warp (none) unless asked for
        assert (params["pool"], params["final_bias"], params["presence_averaging"], params["warp"]) == (
            "max", False, "batch", None)
        assert params["recipe"] == "paper"


def test_original_recipe_plans_the_grid_with_the_original_codes_defaults():
    result = invoke("plan", "--recipe", "original", "--output-root", "original")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 28
    for line, setting in zip(lines, table3.TABLE3):
        params = parse_train(shlex.split(line)[1:])
        assert params["recipe"] == "original" and params["output_dir"] == Path(f"original/table3-{setting.id}")
        # the row's own settings, as in the paper recipe's plan
        assert (params["depth"], params["width"], params["reflect"], params["epochs"]) == (
            setting.depth, setting.width, setting.reflect, setting.epochs)
        assert (params["severity_factor"], params["presence_smoothing"]) == (setting.severity_factor, setting.presence_smoothing)
        # no eps_s (the original's graded-only loss has none) and the recipe's warp, batch, weight decay
        assert (params["severity_smoothing"], params["warp"], params["batch_size"], params["weight_decay"]) == (
            None, None, None, None)
    warped = [parse_train(shlex.split(line)[1:])["warp"] for line in invoke("plan", "1", "--recipe", "original", "--no-warp").output.splitlines()]
    assert warped == [0.0]
    assert invoke("plan", "1", "--recipe", "nonsense").exit_code != 0


def test_warp_switch_adds_the_original_warp():
    result = invoke("plan", "1", "14", "--warp", "--output-root", "warped")
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert all(parse_train(shlex.split(line)[1:])["warp"] == 0.5 for line in lines)


def test_subsets_and_overrides():
    result = invoke("plan", "3-4,27", "--extra=--epochs 1 --no-pretrained")
    lines = result.output.splitlines()
    assert [shlex.split(line)[shlex.split(line).index("--output-dir") + 1] for line in lines] == [
        "outputs/table3-3", "outputs/table3-4", "outputs/table3-27"]
    params = parse_train(shlex.split(lines[0])[1:])
    assert params["epochs"] == 1 and params["pretrained"] is False  # the last value wins
    assert invoke("plan", "29").exit_code != 0


def test_a_failing_run_exits_non_zero(tmp_path):
    result = invoke("run", "1", "--directory", str(tmp_path / "missing"), "--output-root", str(tmp_path))
    assert result.exit_code != 0


@pytest.mark.slow
def test_one_epoch_tiny_run_of_one_setting_and_collect(tmp_path):
    generate_dataset(tmp_path / "data", scans=8, test_scans=0, seed=3, slice_size=32, depth_scale=0.05)
    overrides = (f"--epochs 1 --depth 8 --width 32 --batch-size 3 --penultimate 8 --no-pretrained --device cpu "
                 f"--precision fp32 --workers 1 --cache-dir {tmp_path / 'cache'}")
    result = invoke("run", "26", "--directory", str(tmp_path / "data"), "--output-root", str(tmp_path),
                    f"--extra={overrides}")
    assert result.exit_code == 0, result.output
    run = tmp_path / "table3-26"
    config = json.loads((run / "config.json").read_text())
    assert (config["severity_factor"], config["reflect"], config["epochs"], config["depth"]) == (0.5, False, 1, 8)
    best = json.loads((run / "summary.json").read_text())["best_scores"]

    tta = json.loads((run / "summary.json").read_text())["tta_scores"]
    assert set(tta) == {"presence_f1", "severity_f1"}

    table = invoke("collect", "--output-root", str(tmp_path)).output.splitlines()
    assert len(table) == 3  # header, rule, one run
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert cells[0] == "26" and cells[3] == "No"
    assert cells[8:] == [f"{best['presence_f1']:.4f}", f"{best['severity_f1']:.4f}",
                         f"{tta['presence_f1']:.4f}", f"{tta['severity_f1']:.4f}", "0.8973", "0.6143"]

    # the paper's submissions from this one-run grid: five folders of competition files
    result = invoke(
        "submission", str(tmp_path / "data" / "validation"), "--output-root", str(tmp_path),
        "--submission-root", str(tmp_path / "subs"), f"--extra=--device cpu --precision fp32 --cache-dir {tmp_path / 'cache'}")
    assert result.exit_code == 0, result.output
    folders = sorted(path.name for path in (tmp_path / "subs").iterdir())
    assert folders == [f"submission-{k}" for k in range(1, 5)] + ["submission-5-ensemble"]
    for folder in folders:
        assert (tmp_path / "subs" / folder / "covid.csv").is_file() and (tmp_path / "subs" / folder / "mild.csv").is_file()
        assert json.loads((tmp_path / "subs" / folder / "models.json").read_text())["presence"] == [26]


def fake_grid(root: Path, scores: dict[int, tuple[float | None, float | None]]) -> None:
    """summary.json files of finished runs: {setting ID: (best presence F1, best severity F1)}."""
    for setting_id, (presence, severity) in scores.items():
        folder = root / f"table3-{setting_id}"
        folder.mkdir(parents=True)
        best = {k: v for k, v in (("presence_f1", presence), ("severity_f1", severity)) if v is not None}
        tta = {k: v - 0.01 for k, v in best.items()}
        (folder / "summary.json").write_text(json.dumps({"best_scores": best, "tta_scores": tta}))


def test_submission_plan_takes_the_four_best_of_each_task(tmp_path):
    # IDs 4 (lambda = 0) and 28 (lambda = 1) train one task each; the ranks follow the scores, not the IDs
    fake_grid(tmp_path, {1: (0.90, 0.40), 4: (0.95, None), 5: (0.91, 0.60), 14: (0.88, 0.75), 16: (0.70, 0.65),
                         28: (None, 0.70), 3: (0.89, 0.30)})
    plan = table3.submission_plan(table3.collected_results(tmp_path))
    assert [name for name, _, _ in plan] == ["submission-1", "submission-2", "submission-3", "submission-4",
                                             "submission-5-ensemble"]
    assert [[r.setting.id for r in presence] for _, presence, _ in plan] == [[4], [5], [1], [3], [4, 5, 1, 3]]
    assert [[r.setting.id for r in severity] for _, _, severity in plan] == [[14], [28], [16], [5], [14, 28, 16, 5]]

    result = invoke("submission", "TEST1", "--severity-test", "TEST2", "--output-root",
                    str(tmp_path), "--submission-root", "subs", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = [shlex.split(line) for line in result.output.splitlines()]
    assert len(lines) == 10  # per submission: task 1 on TEST1 with presence models, task 2 on TEST2 with severity models
    first, second = lines[0], lines[1]
    assert first[:3] == ["cov3d", "infer", "TEST1"] and "--severity-model" not in first
    assert first[first.index("--presence-model") + 1] == str(tmp_path / "table3-4")
    assert first[first.index("--submission-dir") + 1] == "subs/submission-1/task1"
    assert second[:3] == ["cov3d", "infer", "TEST2"] and "--presence-model" not in second
    assert second[second.index("--severity-model") + 1] == str(tmp_path / "table3-14")
    assert lines[-1].count("--severity-model") == 4
    assert not Path("subs").exists()
