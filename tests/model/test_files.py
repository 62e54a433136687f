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
from cov3d.model.files import expand_models, export_model, load_source
from cov3d.runfiles import CONFIG_FILE, WEIGHTS_BY_METRIC, WEIGHTS_FILES
from cov3d.settings import VolumeShape


class Payload:
    """Unpickling this creates the file ``marker``: what a malicious model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def exported(tiny_run, module_dir):
    return export_model(tiny_run, module_dir / "model.safetensors")


def test_config_names_the_weights_files(tiny_run):
    config = json.loads((tiny_run / CONFIG_FILE).read_text())
    assert config["checkpoints"] == WEIGHTS_BY_METRIC
    assert config["speed"]["evaluation_passes"] == 6  # two tasks' kept weights, three validation passes each


def test_export_round_trip(tiny_run, exported):
    source = load_source(exported)
    config = json.loads((tiny_run / "config.json").read_text())
    assert "data_dir" not in source.config
    assert source.config["penultimate"] == config["penultimate"] and source.size == (8, 32, 32)
    for task, name in WEIGHTS_FILES.items():
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
    (run / WEIGHTS_FILES["presence"]).write_bytes(pickle.dumps(Payload(marker)))
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


def test_a_header_length_that_starts_like_a_pickle_still_loads(exported, tmp_path):
    """Safetensors pads its header to 8 bytes, so one header length in 32 has 0x80, the pickle opcode, as
    its first byte: such a file is read as safetensors (an added metadata key leaves the checksum valid)."""
    data = exported.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_size])
    for padding in range(256):
        header["__metadata__"]["note"] = "x" * padding
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        if len(text) % 256 == 0x80:
            break
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + header_size:])
    assert path.read_bytes()[:1] == b"\x80"
    source, original = load_source(path), load_source(exported)
    assert source.config == original.config
    assert all(torch.equal(source.states["presence"][key], value) for key, value in original.states["presence"].items())


def pickle_that_starts_like_safetensors(marker) -> bytes:
    """A live pickle of ``Payload(marker)`` whose first 9 bytes read as a safetensors start: a 2-character
    string "\\x00{" (popped again) puts ``{`` at byte 8, and the header length its first 8 bytes spell
    (39,322,240) fits in the file, padded with zeros after the pickle's STOP."""
    opcodes = b"\x80\x02" + b"X" + struct.pack("<I", 2) + b"\x00{" + b"0" + pickle.dumps(Payload(marker), protocol=2)[2:]
    (header_size,) = struct.unpack("<Q", opcodes[:8])
    return opcodes + b"\x00" * (header_size + 8 - len(opcodes))


def test_a_pickle_crafted_to_start_like_safetensors_is_refused_and_never_runs(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle_that_starts_like_safetensors(control)).close()
    assert control.exists()  # the crafted file is a live pickle
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(pickle_that_starts_like_safetensors(marker))
    with pytest.raises(Cov3dError, match="not a valid cov3d model file") as error:
        load_source(path)
    assert "\n" not in str(error.value) and not marker.exists()


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


OLD_CONFIG = {  # a config.json as runs wrote it before final_bias, presence_averaging and warp were recorded
    "depth": 4, "height": 16, "width": 16, "epochs": 1, "batch_size": 2, "learning_rate": 1e-4, "weight_decay": 1e-5,
    "severity_factor": 0.5, "presence_smoothing": 0.1, "severity_smoothing": 0.1, "penultimate": 8, "dropout": 0.5,
    "pool": "avg", "reflect": True, "fast_decode": False, "seed": 0, "outputs": 6, "data_dir": "DATA",
}


@pytest.mark.slow
def test_old_run_without_the_new_keys_loads_and_predicts_as_before(tmp_path, tiny_dataset):
    from safetensors.torch import save_file

    from cov3d.inference.infer import infer
    from cov3d.model.network import build_model
    from cov3d.preprocessing.preprocess import VolumeCache
    from cov3d.settings import TrainSettings
    from cov3d.training.runconfig import recorded_settings

    torch.manual_seed(0)
    old_models = {task: build_model(outputs=6, penultimate=8, pool="avg", final_bias=True).eval() for task in WEIGHTS_FILES}
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(OLD_CONFIG))
    for task, name in WEIGHTS_FILES.items():
        save_file({k: v.contiguous() for k, v in old_models[task].state_dict().items()}, str(run / name))

    source = load_source(run)
    assert (source.config["final_bias"], source.config["pool"], source.warp) == (True, "avg", 0.0)
    volume = torch.rand(2, 1, 4, 16, 16)
    with torch.no_grad():
        for task, model in old_models.items():
            assert torch.equal(source.build(task)(volume), model(volume))

    scan = sorted((tiny_dataset / "test").iterdir())[0]
    infer([scan], run, tmp_path / "preds.csv", cache_dir=tmp_path / "cache", device="cpu", precision="fp32",
          progress=False)
    row = (tmp_path / "preds.csv").read_text().splitlines()[1].split(",")
    levels = VolumeCache(tmp_path / "cache", VolumeShape(4, 16, 16)).get(scan)[None]
    with torch.no_grad():
        expected = (torch.sigmoid(old_models["presence"](levels)[0, 0])
                    + torch.sigmoid(old_models["presence"](levels.flip(-1))[0, 0])) / 2
    assert float(row[2]) == pytest.approx(float(expected), abs=1e-6)

    settings = recorded_settings(OLD_CONFIG, run, TrainSettings)  # what --resume rebuilds for an old run
    assert (settings.pool, settings.final_bias, settings.presence_averaging, settings.shape.warp) == ("avg", True, "weighted", 0.0)
    export_model(run, tmp_path / "old.safetensors")  # an old run still exports, with the keys written out
    assert load_source(tmp_path / "old.safetensors").config["final_bias"] is True


def test_new_run_records_the_faithful_defaults(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert (config["pool"], config["final_bias"], config["presence_averaging"], config["warp"]) == ("max", False, "batch", 0.0)
    assert "fc.3.bias" not in load_file(str(tiny_run / WEIGHTS_FILES["presence"]))


def test_the_window_is_recorded_in_the_run_and_the_model_file(tiny_run, exported):
    from cov3d.window import DEFAULT_WINDOW

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
    for name in WEIGHTS_FILES.values():
        os.link(tiny_run / name, folder / name)
    return folder


def test_models_without_a_window_use_the_default_and_inference_follows_the_model(tiny_run, tmp_path):
    from cov3d.model.predictor import RunPredictor
    from cov3d.window import DEFAULT_WINDOW, Window

    old = load_source(run_with_config(tiny_run, tmp_path / "old", lambda config: config.pop("window")))
    assert old.window == DEFAULT_WINDOW
    other = load_source(run_with_config(tiny_run, tmp_path / "other", lambda config: config.update(window="-600,1500")))
    assert other.window == Window(-600, 1500)
    cpu = torch.device("cpu")
    assert RunPredictor(other, cpu, None).shape.window == Window(-600, 1500)
    assert RunPredictor(other, cpu, None, window=Window(-450, 1500)).shape.window == Window(-450, 1500)  # --window overrides


def test_an_invalid_window_is_refused(tiny_run, tmp_path):
    bad = run_with_config(tiny_run, tmp_path / "bad", lambda config: config.update(window="level,width"))
    with pytest.raises(Cov3dError, match="invalid window"):
        load_source(bad)
