"""Temperatures as a model carries them: recorded in config.json and exported files, applied by infer
(unless --uncalibrated) without moving a decision, and named when missing; fitted after training on
the kept weights' validation predictions in one pass of the network."""

import csv
import json
import math
import shutil

import pytest
import torch
from figure_checks import assert_panels_differ, assert_size
from safetensors.torch import save_file
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.dataset.scans import find_scans
from cov3d.errors import Cov3dError
from cov3d.inference.ensemble import Ensemble
from cov3d.inference.infer import calibration_note, infer
from cov3d.model.calibration import fit_temperature
from cov3d.model.files import ModelSource, check_config, export_model, load_source
from cov3d.model.network import build_model
from cov3d.model.predictor import RunPredictor
from cov3d.runfiles import WEIGHTS_FILES

SIZE = (4, 16, 16)
GRADES = ("mild", "moderate", "severe", "critical")


def make_run(folder, *, seed, temperatures=None, outputs=6, tasks=("presence", "severity")):
    """An untrained run folder (config.json, random weights for ``tasks``), with ``temperatures`` if given."""
    folder.mkdir(parents=True)
    depth, height, width = SIZE
    config = {"depth": depth, "height": height, "width": width, "outputs": outputs, "penultimate": 8,
              "dropout": 0.5, "pool": "max", "final_bias": True}
    if temperatures is not None:
        config["temperatures"] = temperatures
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    for task in tasks:
        model = build_model(outputs=outputs, penultimate=8, final_bias=True)
        with torch.no_grad():
            model.fc[-1].bias.uniform_(-2, 2)  # logits away from 0, so that a temperature shows
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(folder / WEIGHTS_FILES[task]))
    return folder


def run_infer(scans, models, out, name, **options):
    summary = infer(scans, models, out / name, cache_dir=out / "cache", device="cpu", precision="fp32",
                    progress=False, workers=0, **options)
    with (out / name).open() as handle:
        return list(csv.DictReader(handle)), summary


def logit(p):
    return math.log(p) - math.log1p(-p)


@pytest.fixture(scope="module")
def runs(module_dir):
    """A run with temperatures for both tasks; a lambda = 1 run (severity weights only) with temperatures;
    an older run without any."""
    return {
        "run": make_run(module_dir / "run", seed=5, temperatures={"presence": 2.5, "severity": 0.5}),
        "graded": make_run(module_dir / "graded", seed=9, tasks=("severity",), temperatures={"presence": 3.0, "severity": 1.0}),
        "old": make_run(module_dir / "old", seed=6, tasks=("severity",)),
    }


def test_infer_applies_the_temperatures_and_keeps_the_decisions(tiny_dataset, tmp_path, runs):
    scans = find_scans([tiny_dataset / "test"])[:2]
    calibrated, summary = run_infer(scans, runs["run"], tmp_path, "calibrated.csv")
    result = CliRunner().invoke(app, ["infer", *map(str, scans), "--model", str(runs["run"]), "--output", str(tmp_path / "raw.csv"),
                                      "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--precision", "fp32",
                                      "--workers", "0", "--uncalibrated"])
    assert result.exit_code == 0, result.output
    with (tmp_path / "raw.csv").open() as handle:
        raw = list(csv.DictReader(handle))
    assert "Probabilities calibrated" in summary.calibration and "uncalibrated (--uncalibrated)" in result.stderr
    for scaled, plain in zip(calibrated, raw):
        assert (scaled["covid"], scaled["severity"]) == (plain["covid"], plain["severity"])
        # one model: P = sigmoid(l / T) with l = logit of the uncalibrated P (the mean over the reflection)
        p = float(plain["covid_probability"])
        assert float(scaled["covid_probability"]) == pytest.approx(1 / (1 + math.exp(-logit(p) / 2.5)), abs=2e-6)
        # severity: P_k proportional to (uncalibrated P_k)^(1 / T)
        powered = [float(plain[f"{grade}_probability"]) ** 2 for grade in GRADES]
        assert [float(scaled[f"{grade}_probability"]) for grade in GRADES] == pytest.approx(
            [value / sum(powered) for value in powered], abs=2e-6)
    assert any(abs(float(a["covid_probability"]) - float(b["covid_probability"])) > 1e-3 for a, b in zip(calibrated, raw))


def test_a_model_without_temperatures_is_reported_uncalibrated(tiny_dataset, tmp_path, runs):
    scans = find_scans([tiny_dataset / "test"])[:1]
    old = runs["old"]
    rows, summary = run_infer(scans, old, tmp_path, "old.csv")
    assert len(rows) == 1 and summary.failed == []
    assert f"uncalibrated for presence of {old}, severity of {old}" in summary.calibration
    source = load_source(runs["graded"])
    partial = ModelSource(source.path, {**source.config, "temperatures": {"presence": 0.5}}, source.states)
    note = calibration_note(Ensemble([partial], torch.device("cpu"), None), calibrated=True)
    assert f"severity of {source.path}" in note and "presence of" not in note


def test_temperatures_travel_in_exported_files_and_bad_ones_are_refused(tmp_path, runs):
    exported = load_source(export_model(runs["graded"], tmp_path / "model.safetensors"))
    assert (exported.temperature("presence"), exported.temperature("severity")) == (3.0, 1.0)
    assert load_source(runs["old"]).temperature("severity") is None
    config = json.loads((runs["graded"] / "config.json").read_text())
    for bad in ({"presence": 0}, {"presence": -1.0}, {"presence": "2"}, {"presence": math.inf}, {"elsewhere": 1.0}, [1.0]):
        with pytest.raises(Cov3dError, match="temperatures"):
            check_config({**config, "temperatures": bad}, tmp_path / "config.json")


def test_lambda_one_runs_calibrate_presence_from_the_severity_weights(runs):
    """No presence weights: P(covid) = s_1 + .. + s_4 of the severity weights, scaled by the presence T."""
    volumes = torch.rand(2, 1, *SIZE)
    predictor = RunPredictor(load_source(runs["graded"]), torch.device("cpu"), None, reflect=False)
    raw, scaled = predictor.samples(volumes)
    with torch.no_grad():
        z = predictor.severity_model(volumes)[:, 1:]
    covid = torch.softmax(z, dim=1)[:, 1:].sum(dim=1)
    assert raw[0, :, 0] == pytest.approx(covid, abs=1e-6)
    assert scaled[0, :, 0] == pytest.approx(torch.sigmoid(torch.logit(covid.double()) / 3.0).float(), abs=1e-6)
    assert predictor.uncalibrated_tasks == []


def test_training_fits_temperatures_on_one_pass_of_the_validation_set(tmp_path, monkeypatch, runs):
    """``evaluate_kept_weights``: one pooled pass per task and batch; the presence T is the NLL fit on the
    mean of sigmoid(x) over each scan and its reflection, computed here with the network directly."""
    from cov3d.training.evaluation import evaluate_kept_weights

    run = shutil.copytree(runs["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({key: value for key, value in config.items() if key != "temperatures"}))
    torch.manual_seed(11)
    batches = [(torch.rand(3, 1, *SIZE), torch.tensor([[1.0, 2], [0, 0], [1, 1]])),
               (torch.rand(3, 1, *SIZE), torch.tensor([[0.0, 0], [1, 0], [1, 4]]))]
    passes = []
    pooled = RunPredictor._pooled
    monkeypatch.setattr(RunPredictor, "_pooled", lambda self, model, volumes: passes.append(1) or pooled(self, model, volumes))
    summary = evaluate_kept_weights(run, batches, torch.device("cpu"))
    assert len(passes) == 2 * len(batches)  # presence and severity weights, each batch once

    model = load_source(run).build("presence")
    with torch.no_grad():
        p = torch.cat([(torch.sigmoid(model(v)[:, 0]) + torch.sigmoid(model(v.flip(-1))[:, 0])) / 2 for v, _ in batches])
    truth = torch.cat([t[:, 0] for _, t in batches]).long()
    expected = fit_temperature("presence", torch.logit(p.double()).numpy(), truth.numpy())
    config = json.loads((run / "config.json").read_text())
    assert config["temperatures"]["presence"] == pytest.approx(expected, rel=1e-4)
    calibration = summary["calibration"]
    assert calibration["presence"]["temperature"] == config["temperatures"]["presence"]
    assert calibration["presence"]["scans"] == 6 and calibration["severity"]["scans"] == 3  # graded scans only
    assert calibration["ece_bins"].startswith("10 equal-width bins")
    for task in ("presence", "severity"):
        entry = calibration[task]
        assert entry["nll_after"] <= entry["nll_before"] + 1e-12
        assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(entry)
    assert set(summary["tta_scores"]) == {"presence_f1", "severity_f1"}
    assert_panels_differ(assert_size(run / "reliability.png", 760, 460), rows=1, columns=2)  # 3.8 in per task, 100 dpi


def test_explain_reports_the_calibrated_probability(tiny_dataset, tmp_path, runs):
    from cov3d.inference.explain import explain
    from cov3d.inference.views import model_volume

    scan = find_scans([tiny_dataset / "test"])[0]
    result = explain(scan, runs["run"], tmp_path / "explain", cache_dir=tmp_path / "cache", device="cpu", precision="fp32")
    source = load_source(runs["run"])
    volume = model_volume(scan, source.shape, tmp_path / "cache")
    with torch.no_grad():
        x = float(source.build("presence")(volume[None])[0, 0])
    assert result["probability"] == pytest.approx(1 / (1 + math.exp(-x / 2.5)), abs=1e-5)


def test_a_lambda_one_run_gets_both_tasks_from_one_pass_of_its_severity_weights(runs, monkeypatch):
    from cov3d.training.evaluation import kept_weights_predictions

    batches = [(torch.rand(2, 1, *SIZE), torch.tensor([[1.0, 3], [0, 0]]))]
    passes = []
    pooled = RunPredictor._pooled
    monkeypatch.setattr(RunPredictor, "_pooled", lambda self, model, volumes: passes.append(1) or pooled(self, model, volumes))
    predictions = kept_weights_predictions(runs["graded"], batches, torch.device("cpu"))
    assert sorted(predictions) == ["presence", "severity"] and len(passes) == 1
    logits, targets = predictions["presence"]
    model = load_source(runs["graded"]).build("severity")
    with torch.no_grad():
        s = [torch.softmax(model(v)[:, 1:], dim=1) for v in (batches[0][0], batches[0][0].flip(-1))]
    covid = ((s[0] + s[1]) / 2)[:, 1:].sum(dim=1)  # the paper's P(covid) of a lambda = 1 run, averaged over the views
    assert torch.sigmoid(torch.from_numpy(logits[:, 0])) == pytest.approx(covid, abs=1e-6)
    assert targets.tolist() == [[1.0, 3.0], [0.0, 0.0]]
