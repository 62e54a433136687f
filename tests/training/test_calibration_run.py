"""A trained run's calibration end to end: temperatures in config.json and summary.json, the reliability
diagram, and infer's decisions and macro F1 on the validation scans the same with and without them."""

import csv
import json

import pytest
from figure_checks import assert_panels_differ, assert_size

from cov3d.dataset.scans import find_scans
from cov3d.inference.infer import infer
from cov3d.model.metrics import macro_f1


def test_training_records_and_reports_the_calibration(tiny_run, tiny_dataset, tmp_path):
    config = json.loads((tiny_run / "config.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    calibration = summary["calibration"]
    tasks = sorted(config["temperatures"])
    assert tasks and set(tasks) <= {"presence", "severity"}
    for task in tasks:
        assert calibration[task]["temperature"] == config["temperatures"][task]
        assert calibration[task]["nll_after"] <= calibration[task]["nll_before"] + 1e-12
        assert 0 <= calibration[task]["ece_after"] <= 1 and 0 <= calibration[task]["brier_after"] <= 2
    assert_panels_differ(assert_size(tiny_run / "reliability.png", 380 * len(tasks), 460), rows=1, columns=len(tasks))

    scans = find_scans([tiny_dataset / "validation"])
    rows = {}
    for name, calibrated in (("calibrated", True), ("raw", False)):
        infer(scans, tiny_run, tmp_path / f"{name}.csv", cache_dir=tmp_path / "cache", device="cpu", precision="fp32",
              progress=False, workers=0, calibrated=calibrated)
        with (tmp_path / f"{name}.csv").open() as handle:
            rows[name] = list(csv.DictReader(handle))
    decisions = {name: [(row["covid"], row["severity"]) for row in table] for name, table in rows.items()}
    assert decisions["calibrated"] == decisions["raw"]
    truth = [int(row["path"].split("/")[-2] == "covid") for row in rows["calibrated"]]
    predicted = [int(row["covid"]) for row in rows["calibrated"]]
    assert macro_f1(truth, predicted, [0, 1]) == pytest.approx(summary["tta_scores"]["presence_f1"], abs=1e-9)
