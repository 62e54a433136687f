"""Training writes both checkpoints, the config and the per-epoch metrics CSV; settings follow the paper."""

import csv
import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cov3d.errors import Cov3dError
from cov3d.model.network import build_model
from cov3d.runfiles import RESUME_FILE, WEIGHTS_BY_METRIC
from cov3d.settings import VolumeShape
from cov3d.training.checkpoint import resume_remedy
from cov3d.training.train import TrainSettings, kept_determinism_flags, seed_everything, train
from cov3d.window import Window


def test_paper_defaults():
    settings = TrainSettings()
    assert (settings.batch_size, settings.learning_rate, settings.weight_decay) == (2, 1e-4, 1e-5)
    assert settings.epochs == 40 and settings.reflect
    assert TrainSettings(severity_factor=0).outputs == 1
    assert TrainSettings(severity_factor=0.1).outputs == 6


def test_one_epoch_writes_checkpoints_config_and_metrics(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert (config["depth"], config["height"], config["width"]) == (8, 32, 32)
    assert config["severity_classes"] == ["negative", "mild", "moderate", "severe", "critical"]
    assert len(config["presence_weights"]) == 2 and len(config["severity_weights"]) == 6

    for file_name in WEIGHTS_BY_METRIC.values():
        state = load_file(str(tiny_run / file_name))
        model = build_model(outputs=6, penultimate=16)
        model.load_state_dict(state)  # strict: every key and shape matches the architecture
        assert model(torch.rand(1, 1, 8, 32, 32)).shape == (1, 6)

    with (tiny_run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    for column in ("train_loss", "valid_loss", "presence_f1", "severity_f1"):
        assert column in rows[0]
    assert 0.0 <= float(rows[0]["presence_f1"]) <= 1.0
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["best_scores"]["presence_f1"] == pytest.approx(float(rows[0]["presence_f1"]))


@pytest.mark.slow
def test_presence_only_run_keeps_one_checkpoint(tmp_path, tiny_dataset):
    """(Also: a new run in a folder where a run killed while writing its config.json left a temporary
    file, and nothing else, starts and removes that file.)"""
    settings = TrainSettings(shape=VolumeShape(8, 32, 32), epochs=1, penultimate=8, severity_factor=0.0)
    leftover = tmp_path / "run" / ".config.json.x1y2_z3w.tmp"
    leftover.parent.mkdir()
    leftover.write_text('{"half')
    result = train(
        tiny_dataset, tmp_path / "run", settings, cache_dir=tmp_path / "cache", pretrained=False,
        device="cpu", precision="fp32", workers=1,
    )
    assert (result.run_dir / WEIGHTS_BY_METRIC["presence_f1"]).is_file()
    assert not (result.run_dir / WEIGHTS_BY_METRIC["severity_f1"]).exists()
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["outputs"] == 1
    assert config["speed"]["evaluation_passes"] == 3  # one task: its confusion matrix, the scan and its reflection
    assert not leftover.exists()


def test_missing_kinetics_weights_is_a_clear_error(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(Cov3dError, match="--no-pretrained"):
        train(tiny_dataset, tmp_path / "run", TrainSettings(epochs=1), cache_dir=tmp_path / "cache", device="cpu")


@pytest.mark.parametrize("before", [(False, False, False, True), (True, True, True, False)])
def test_seeding_leaves_the_callers_determinism_flags_as_they_were(before):
    """train() seeds inside kept_determinism_flags: the caller's torch and cuDNN settings come back."""
    def flags():
        return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)

    original = flags()
    try:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]
        with kept_determinism_flags():
            seed_everything(0, torch.device("cpu"))
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert torch.are_deterministic_algorithms_enabled()
        assert flags() == before
    finally:
        torch.use_deterministic_algorithms(original[0], warn_only=original[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = original[2:]


@pytest.mark.slow
def test_full_disk_while_saving_the_best_weights(tmp_path, tiny_dataset, monkeypatch):
    """The disk fills up while the best weights are written: one line, and no torn or temporary file."""
    real_write_bytes = Path.write_bytes

    def fill_the_disk(path, data):
        if not (path.name.startswith(".best-") and path.name.endswith(".tmp")):
            return real_write_bytes(path, data)
        real_write_bytes(path, data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", fill_the_disk)
    run = tmp_path / "run"
    settings = TrainSettings(shape=VolumeShape(8, 32, 32), epochs=1, penultimate=8, severity_factor=0.0)
    with pytest.raises(Cov3dError) as error:
        train(tiny_dataset, run, settings, cache_dir=tmp_path / "cache", pretrained=False, device="cpu",
              precision="fp32", workers=1)
    best = run / WEIGHTS_BY_METRIC["presence_f1"]
    assert str(error.value) == f"Cannot write {best}: No space left on device. {resume_remedy(run)}"
    assert "start the run again" in str(error.value)
    assert not best.exists() and not list(run.glob(".*"))


def test_resume_remedy_names_the_command_once_a_checkpoint_exists(tmp_path):
    assert "start the run again" in resume_remedy(tmp_path)
    (tmp_path / RESUME_FILE).write_bytes(b"")
    assert resume_remedy(tmp_path).endswith(f"cov3d train --resume {tmp_path}")


def test_the_window_is_parsed_once_and_recorded_as_text():
    assert TrainSettings().to_config()["window"] == "-470,1410"
    shape = VolumeShape(4, 8, 8, window=Window.parse(" -450 , 1500 "))
    assert TrainSettings(shape=shape).to_config()["window"] == "-450,1500"
    with pytest.raises(Cov3dError, match="window"):
        Window.parse("-450")
    with pytest.raises(TypeError, match="Window"):
        VolumeShape(4, 8, 8, window="-450,1500")  # text is parsed where it is read, not below


def test_kept_metrics_per_task_or_one_checkpoint():
    from cov3d.training.checkpoint import kept_metrics

    assert kept_metrics(TrainSettings()) == ["presence_f1", "severity_f1"]
    assert kept_metrics(TrainSettings(severity_factor=0.0)) == ["presence_f1"]
    assert kept_metrics(TrainSettings.for_recipe("original")) == ["presence_f1"]
    assert kept_metrics(TrainSettings.for_recipe("original", severity_factor=1.0)) == ["severity_f1"]


def test_the_run_loss_follows_the_recipe():
    from cov3d.model.loss import Cov3dLoss
    from cov3d.model.original_loss import OriginalCodeLoss
    from cov3d.training.data import TrainingItem
    from cov3d.training.train import build_loss

    items = [TrainingItem(Path(f"s{i}"), "train", covid, 0) for i, covid in enumerate([1, 0, 0, 0, 1, 0, 0])]
    paper = build_loss(TrainSettings(), items)
    assert type(paper) is Cov3dLoss and paper.presence_weights.tolist() == pytest.approx([7 / 10, 7 / 4])
    original = build_loss(TrainSettings.for_recipe("original"), items)
    assert isinstance(original, OriginalCodeLoss) and original.pos_weight == pytest.approx(5 / 2)
    assert original.graded_only and original.outputs == 5


@pytest.mark.slow
def test_one_epoch_of_the_original_recipe(tmp_path, tiny_dataset):
    """A tiny run with the original code's defaults: 1 + 4 outputs, one checkpoint used for both tasks,
    the recipe recorded; it exports and predicts."""
    from cov3d.inference.infer import infer
    from cov3d.model.files import export_model, load_source

    settings = TrainSettings.for_recipe("original", shape=VolumeShape(8, 32, 32), epochs=1, penultimate=8, batch_size=3)
    run = train(tiny_dataset, tmp_path / "run", settings, cache_dir=tmp_path / "cache", pretrained=False,
                device="cpu", precision="fp32", workers=1).run_dir
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["outputs"], config["presence_decision"]) == ("original", 5, "mean-logit")
    assert config["checkpoints"] == {"presence_f1": WEIGHTS_BY_METRIC["presence_f1"]}
    assert config["presence_pos_weight"] > 0
    assert (run / WEIGHTS_BY_METRIC["presence_f1"]).is_file() and not (run / WEIGHTS_BY_METRIC["severity_f1"]).exists()
    summary = json.loads((run / "summary.json").read_text())  # both tasks' best epochs are still recorded
    assert set(summary["best_scores"]) == {"presence_f1", "severity_f1"}
    exported = export_model(run, tmp_path / "model.safetensors")
    source = load_source(exported)
    assert set(source.states) == {"presence", "severity"} and source.states["presence"] is source.states["severity"]
    inferred = infer(sorted((tiny_dataset / "test").iterdir()), exported, output=tmp_path / "preds.csv", cache_dir=tmp_path / "cache",
                    device="cpu", precision="fp32", workers=0, progress=False)
    with (tmp_path / "preds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert inferred.predicted == len(rows) > 0 and all(row["severity"] for row in rows)


def test_one_checkpoint_records_every_tasks_best_but_keeps_one_set_of_weights(tmp_path):
    from types import SimpleNamespace

    from cov3d.training.checkpoint import BestCheckpoints

    best = BestCheckpoints(tmp_path, ["presence_f1", "severity_f1"], kept=["presence_f1"])
    names = ["epoch", "train_loss", "valid_loss", "presence_f1", "severity_f1", "time"]
    for epoch, (presence, severity) in enumerate([(0.5, 0.4), (0.4, 0.6)]):
        best.learn = SimpleNamespace(model=torch.nn.Linear(2, 2), epoch=epoch, recorder=SimpleNamespace(
            metric_names=names, log=[epoch, 0.7, 0.7, presence, severity, "00:01"]))
        best.after_epoch()
    assert best.best == {"presence_f1": 0.5, "severity_f1": 0.6} and best.best_epoch == {"presence_f1": 0, "severity_f1": 1}
    assert sorted(path.name for path in tmp_path.iterdir()) == [WEIGHTS_BY_METRIC["presence_f1"]]
