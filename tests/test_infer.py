"""Inference writes one valid row per scan, averages each scan with its reflection, and writes submissions."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from cov3d.errors import Cov3dError
from cov3d.infer import CSV_COLUMNS, infer
from cov3d.model import build_model
from cov3d.preprocess import VolumeCache
from cov3d.scans import find_scans, scan_number


@pytest.fixture(scope="module")
def predictions(tiny_run, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("predictions")
    scans = find_scans([tiny_dataset / "test"])
    rows, failed = infer(
        scans, tiny_run, out / "preds.csv", cache_dir=out / "cache", device="cpu", precision="fp32",
        submission_dir=out / "submission", progress=False,
    )
    return out, scans, rows, failed


def test_one_valid_row_per_scan(predictions):
    out, scans, rows, failed = predictions
    assert failed == []
    with (out / "preds.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        written = list(reader)
    assert [row["path"] for row in written] == [str(scan) for scan in scans]
    for row in written:
        probability = float(row["covid_probability"])
        assert 0.0 <= probability <= 1.0
        assert row["covid"] == str(int(probability >= 0.5))
        severity = [float(row[f"{label}_probability"]) for label in ("mild", "moderate", "severe", "critical")]
        assert sum(severity) == pytest.approx(1.0, abs=1e-5)
        assert row["severity"] == ("mild", "moderate", "severe", "critical")[severity.index(max(severity))]


def test_probability_is_the_mean_over_the_scan_and_its_reflection(predictions, tiny_run):
    out, scans, rows, _ = predictions
    config = json.loads((tiny_run / "config.json").read_text())
    model = build_model(outputs=6, penultimate=config["penultimate"]).eval()
    model.load_state_dict(load_file(str(tiny_run / "best-presence.safetensors")))
    volume = VolumeCache(out / "cache", 8, 32, 32).get(scans[0])[None]
    with torch.no_grad():
        both = [torch.sigmoid(model(view)[0, 0]) for view in (volume, volume.flip(-1))]
    assert float(rows[0]["covid_probability"]) == pytest.approx(float((both[0] + both[1]) / 2), abs=1e-5)


def test_submission_files_sorted_by_scan_number(predictions):
    out, scans, rows, _ = predictions
    covid = (out / "submission" / "covid.csv").read_text().split()
    non_covid = (out / "submission" / "non-covid.csv").read_text().split()
    assert sorted(covid + non_covid) == sorted(row["name"] for row in rows)
    assert covid == sorted(covid, key=scan_number)
    severity_files = [(out / "submission" / f"{s}.csv").read_text().split() for s in ("mild", "moderate", "severe", "critical")]
    assert sum(len(names) for names in severity_files) == len(rows)


def test_not_a_run_is_a_clear_error(tmp_path, tiny_dataset):
    with pytest.raises(Cov3dError, match="config.json"):
        infer(find_scans([tiny_dataset / "test"]), tmp_path, tmp_path / "p.csv", cache_dir=tmp_path)
