"""Safe model files: export round trip, and refusal of pickles, tampered files and mismatched configs."""

import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.model.files import CHECKPOINTS, expand_models, export_model, load_source
from cov3d.training import train


class Payload:
    """Unpickling this creates the file ``marker``: what a malicious model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def exported(tiny_run, module_dir):
    return export_model(tiny_run, module_dir / "model.safetensors")


def test_checkpoint_names_match_training():
    assert set(CHECKPOINTS.values()) == set(train.CHECKPOINTS.values())


def test_export_round_trip(tiny_run, exported):
    source = load_source(exported)
    config = json.loads((tiny_run / "config.json").read_text())
    assert "data_dir" not in source.config
    assert source.config["penultimate"] == config["penultimate"] and source.size == (8, 32, 32)
    for task, name in CHECKPOINTS.items():
        original = load_file(str(tiny_run / name))
        assert source.states[task].keys() == original.keys()
        assert all(torch.equal(source.states[task][key], original[key]) for key in original)
    volume = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.build("presence")(volume), load_source(tiny_run).build("presence")(volume))


def test_payload_runs_when_unpickled(tmp_path):
    """The control: the payload used below really does run code when unpickled."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("name", ["model.pth", "learner.pkl", "model.pt", "disguised.safetensors", "noext"])
def test_pickled_model_file_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "ran"
    path = tmp_path / name
    torch.save({"model": Payload(marker)}, path) if name.endswith(".pt") else path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(Cov3dError, match="pickle") as error:
        load_source(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()


def test_pickle_inside_a_run_folder_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "ran"
    (run / CHECKPOINTS["presence"]).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(Cov3dError, match="pickle"):
        load_source(run)
    assert not marker.exists()


def test_tampered_exported_files_are_refused(exported, tmp_path):
    data = bytearray(exported.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(flipped)
    with pytest.raises(Cov3dError, match="checksum"):
        load_source(tmp_path / "flipped.safetensors")

    header = json.loads(data[8:8 + header_size])
    config = json.loads(header["__metadata__"]["config"])
    header["__metadata__"]["config"] = json.dumps({**config, "depth": 16}, sort_keys=True)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "edited.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + header_size:])
    with pytest.raises(Cov3dError, match="checksum"):
        load_source(tmp_path / "edited.safetensors")

    broken = bytearray(data)
    broken[10:20] = b"\x00" * 10
    (tmp_path / "broken.safetensors").write_bytes(broken)
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    for name in ("broken", "short"):
        with pytest.raises(Cov3dError, match="not a valid cov3d model file") as error:
            load_source(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(error.value)


def test_config_that_does_not_match_the_weights(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "penultimate": config["penultimate"] + 1}))
    with pytest.raises(Cov3dError, match="does not match"):
        load_source(run).build("presence")
    with pytest.raises(Cov3dError, match="does not match"):
        export_model(run, tmp_path / "out.safetensors")
    (run / "config.json").write_text(json.dumps({**config, "pool": "median"}))
    with pytest.raises(Cov3dError, match="pool"):
        load_source(run)


def test_folder_of_models_expands(tiny_run, exported, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(tiny_run, folder / "b-run")
    shutil.copy(exported, folder / "a.safetensors")
    (folder / "notes.txt").write_text("x")
    assert expand_models([folder]) == [folder / "a.safetensors", folder / "b-run"]
    with pytest.raises(Cov3dError, match="neither a cov3d run"):
        expand_models([tmp_path])


def test_cli_export_and_refusal(tiny_run, tmp_path, tiny_dataset):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tiny_run), str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{tiny_run.name}.safetensors").is_file()
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    result = runner.invoke(app, ["infer", str(tiny_dataset / "test"), "--model", str(evil), "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")][0].count("pickle") == 1
    assert not (tmp_path / "ran").exists()


def test_the_window_is_recorded_in_the_run_and_the_model_file(tiny_run, exported):
    from cov3d.dataset.intensity import DEFAULT_WINDOW

    assert json.loads((tiny_run / "config.json").read_text())["window"] == str(DEFAULT_WINDOW)
    assert load_source(exported).config["window"] == str(DEFAULT_WINDOW)
    assert load_source(exported).window == DEFAULT_WINDOW


def run_with_config(tiny_run, folder, change):
    """A copy of ``tiny_run`` (weights hard-linked) whose config went through ``change``."""
    import os

    folder.mkdir()
    config = json.loads((tiny_run / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    for name in CHECKPOINTS.values():
        os.link(tiny_run / name, folder / name)
    return folder


def test_models_without_a_window_use_the_default_and_inference_follows_the_model(tiny_run, tmp_path):
    from cov3d.dataset.intensity import DEFAULT_WINDOW, Window
    from cov3d.inference.infer import RunPredictor

    old = load_source(run_with_config(tiny_run, tmp_path / "old", lambda config: config.pop("window")))
    assert old.window == DEFAULT_WINDOW
    other = load_source(run_with_config(tiny_run, tmp_path / "other", lambda config: config.update(window="-600,1500")))
    assert other.window == Window(-600, 1500)
    cpu = torch.device("cpu")
    assert RunPredictor(other, cpu, None).size_key == (8, 32, 32, False, "-600,1500")
    assert RunPredictor(other, cpu, None, window="-450,1500").size_key[-1] == "-450,1500"  # --window overrides


def test_an_invalid_window_is_refused(tiny_run, tmp_path):
    bad = run_with_config(tiny_run, tmp_path / "bad", lambda config: config.update(window="level,width"))
    with pytest.raises(Cov3dError, match="invalid window"):
        load_source(bad)
