"""`cov3d demo` end to end on a tiny setting, and the trivial baseline's scoring."""

import math

from rich.console import Console

from cov3d.synthetic import demo as demo_module
from cov3d.synthetic.demo import DemoSettings, LabelledScan, labelled_test_split, run_demo, score_rows


def test_demo_runs_every_step_and_scores_both_splits(tmp_path, monkeypatch):
    # One epoch on 24 tiny scans cannot be expected to beat the baseline (with seeds 0-2 it mostly does
    # not, with any pooling): here only the wiring is tested, and that the baseline check is made.
    # tests/training/test_numerics.py tests the check itself.
    checked = []
    monkeypatch.setattr(demo_module, "check_beats_baseline", checked.append)
    settings = DemoSettings(scans=24, slice_size=32, depth_scale=0.05, depth=8, width=32, epochs=1, penultimate=8)
    report = run_demo(tmp_path, settings, workers=1, device="cpu", precision="fp32", console=Console(quiet=True))
    assert checked == [report]
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
