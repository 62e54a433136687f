"""`cov3d demo` end to end on a tiny setting, and the trivial baseline's scoring."""

import math
import sys

import pytest
from rich.console import Console
from scripts_loader import load_script

from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.errors import BaselineNotBeaten
from cov3d.workflows.demo import DemoSettings, LabelledScan, labelled_test_split, run_demo, score_rows


@pytest.fixture(scope="module")
def demo(module_dir):
    """A tiny demo run. One epoch on 24 scans of 32x32 need not beat the mean-intensity baseline
    (that check is tested in tests/training/test_numerics.py); every step still runs."""
    settings = DemoSettings(scans=24, slice_size=32, depth_scale=0.05, depth=8, width=32, epochs=1, penultimate=8)
    try:
        report = run_demo(module_dir, settings, workers=1, device="cpu", precision="fp32", console=Console(quiet=True))
    except BaselineNotBeaten as error:  # one epoch on 24 tiny scans need not beat it; every step still ran
        report = error.report
    return module_dir, report


def test_the_demos_validation_scores_are_those_of_cov3d_infer(demo, tmp_path):
    """The demo takes its validation scores from the run's own evaluation of its kept weights
    (summary.json's tta_scores) instead of predicting validation again. That evaluation predicts what
    `cov3d infer` predicts, scan by scan (P(covid) and the severity decision), and scoring infer's rows
    gives the demo's two numbers."""
    import torch

    from cov3d.inference.infer import infer
    from cov3d.model.files import load_source
    from cov3d.preprocessing.preprocess import VolumeCache
    from cov3d.training.data import collect_items
    from cov3d.training.evaluation import kept_weights_predictions
    from cov3d.workflows.demo import labelled

    output_dir, report = demo
    scans = labelled(collect_items(output_dir / "data"), "validation")
    rows = {}
    infer([scan.path for scan in scans], report.run_dir, tmp_path / "validation.csv", cache_dir=output_dir / "cache",
          workers=0, device="cpu", precision="fp32", progress=False, calibrated=False,
          on_row=lambda row: rows.update({row["path"]: row}))
    cache = VolumeCache(output_dir / "cache", load_source(report.run_dir).shape)
    batch = (torch.stack([cache.get(scan.path) for scan in scans]),
             torch.tensor([[scan.has_covid, scan.severity] for scan in scans], dtype=torch.float32))
    predictions = kept_weights_predictions(report.run_dir, [batch], torch.device("cpu"))
    covid = torch.sigmoid(torch.from_numpy(predictions["presence"][0][:, 0])).tolist()
    assert covid == pytest.approx([float(rows[str(scan.path)]["covid_probability"]) for scan in scans], abs=2e-6)
    grades = predictions["severity"][0][:, 1:].argmax(axis=1)
    assert [SEVERITY_LABELS[grade] for grade in grades] == [rows[str(scan.path)]["severity"] for scan in scans]
    expected = score_rows(scans, rows)
    assert any(scan.severity for scan in scans) and math.isfinite(expected["severity_f1"])
    assert report.scores["cov3d validation"] == pytest.approx(expected, abs=1e-12)


def test_demo_runs_every_step_and_scores_both_splits(demo):
    tmp_path, report = demo
    assert set(report.seconds) == {"generate", "preprocess", "train", "infer"}
    assert set(report.scores) == {"cov3d validation", "baseline validation", "cov3d test", "baseline test"}
    for scores in report.scores.values():
        assert 0.0 <= scores["presence_f1"] <= 1.0
    assert report.predictions.is_file() and (report.run_dir / "config.json").is_file()
    lines = report.predictions.read_text().splitlines()
    assert len(lines) == 1 + len(labelled_test_split(tmp_path / "data"))


def test_scores_from_rows_by_hand(tmp_path):
    scans = [LabelledScan(tmp_path / str(i), covid, severity) for i, (covid, severity) in enumerate([(1, 1), (1, 2), (0, 0), (1, 0)])]
    rows = {
        str(scans[0].path): {"covid": "1", "severity": "mild"},
        str(scans[1].path): {"covid": "1", "severity": "mild"},
        str(scans[2].path): {"covid": "1", "severity": "critical"},
        str(scans[3].path): {"covid": "0", "severity": "severe"},
    }
    scores = score_rows(scans, rows)
    # presence: truth 1,1,0,1 vs 1,1,1,0 -> class 1: tp 2 fp 1 fn 1 -> 2/3; class 0: tp 0 -> 0; macro 1/3
    assert math.isclose(scores["presence_f1"], 1 / 3)
    # severity over graded scans only: truth 1,2 vs 1,1 -> label 1: tp1 fp1 -> 2/3; label 2: 0; 3, 4: 0 -> 1/6
    assert math.isclose(scores["severity_f1"], (2 / 3) / 4)


def test_pointing_game_on_the_demo_run(demo, capsys):
    out, _ = demo
    pointing_game = load_script("pointing_game")
    for method in ("gradcam", "occlusion"):
        result = pointing_game.pointing_game(out, method, "layer4", per_scan=True)
        assert result["scans"] >= 1 and result["score"] in {i / result["scans"] for i in range(result["scans"] + 1)}
        assert 0.0 < result["chance"] <= result["chance_dilated"] <= 1.0 and 0 <= result["zero_maps"] <= result["scans"]
        assert 0.0 <= result["energy"] <= 1.0 or (math.isnan(result["energy"]) and result["zero_maps"] == result["scans"])
        assert sum(part["scans"] for part in result["by_severity"].values()) == result["scans"]
        assert "peak (" in capsys.readouterr().out


def test_figures_from_the_demo_run(demo, tmp_path, monkeypatch, capsys):
    out, _ = demo
    make_figures = load_script("make_figures")
    monkeypatch.setattr(sys, "argv", ["make_figures.py", str(out), "--output", str(tmp_path)])
    make_figures.main()
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [
        "confusion-presence.png", "confusion-severity.png", "curves.png", "depth-histogram.png", "gradcam.png",
        "occlusion.png", "scans.png",
    ]
    printed = capsys.readouterr().out
    assert "gradcam of validation/covid/" in printed and "occlusion of validation/covid/" in printed


def test_make_figures_needs_a_trained_demo(tmp_path, monkeypatch):
    make_figures = load_script("make_figures")
    monkeypatch.setattr(sys, "argv", ["make_figures.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="cov3d demo --output"):
        make_figures.main()


def test_the_report_says_the_model_knows_only_phantoms(capsys, tmp_path, monkeypatch):
    """Scores, times, and the run's and predictions' paths each whole on its line (not folded at the
    terminal's width, brackets kept) for the user to copy."""
    from cov3d.cli.training import print_demo_report
    from cov3d.workflows.demo import DemoReport

    monkeypatch.setenv("COLUMNS", "60")
    folder = tmp_path / ("a-long-folder-name-" * 4) / "demo[1]"
    scores = {"presence_f1": 0.9, "severity_f1": 0.6}
    ungraded = {"presence_f1": 0.75, "severity_f1": float("nan")}  # no graded validation scan
    report = DemoReport(scores={"cov3d validation": scores, "cov3d test": ungraded}, seconds={"generate": 1.0, "train": 2.0},
                        run_dir=folder / "run", predictions=folder / "preds.csv")
    print_demo_report(report)
    out = capsys.readouterr().out
    assert "0.900" in out and "total 3 s" in out
    assert f"Run: {folder / 'run'}" in out.splitlines() and f"Test predictions: {folder / 'preds.csv'}" in out.splitlines()
    assert "nan" not in out and [line.split()[-4:] for line in out.splitlines() if "cov3d test" in line] == [["0.750", "│", "none", "│"]]
    assert "synthetic-model flag and say nothing about real scans" in " ".join(out.split())
