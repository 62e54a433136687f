"""cov3d.settings: one value for a volume's shape, the defaults in one place; errors phrased by the CLI."""

import dataclasses
import inspect

import pytest

from cov3d.demo_settings import DemoSettings
from cov3d.errors import Cov3dError, OptionOutOfRange
from cov3d.limits import SIZE
from cov3d.settings import PRESETS, SMALL, TrainSettings, VolumeShape


def test_presets_follow_the_depth_rule_and_name_their_folders():
    for name, shape in PRESETS.items():
        assert shape == VolumeShape.from_width(shape.width) == VolumeShape.from_size(name)
    assert PRESETS["large"].folder_name == "160x320x320"
    assert VolumeShape.from_size("small", fast_decode=True).folder_name == "64x128x128-fast"
    assert TrainSettings().shape == SMALL


def test_from_width_and_from_options():
    assert VolumeShape.from_width(256) == VolumeShape(128, 256, 256)
    assert VolumeShape.from_width(1) == VolumeShape(1, 1, 1)
    assert VolumeShape.from_width(32, height=24) == VolumeShape(16, 24, 32)
    assert VolumeShape.from_options() == SMALL
    assert VolumeShape.from_options(default=VolumeShape(16, 64, 64)) == VolumeShape(16, 64, 64)
    assert VolumeShape.from_options(depth=8, default=VolumeShape(16, 64, 64)) == VolumeShape(8, 128, 128)
    with pytest.raises(Cov3dError, match="not both"):
        VolumeShape.from_options("small", width=64)
    with pytest.raises(Cov3dError, match="Unknown size 'tiny'"):
        VolumeShape.from_options("tiny")


def test_a_config_without_fast_decode_is_an_old_run_decoded_normally():
    config = {"depth": 8, "height": 32, "width": 24}
    assert VolumeShape.from_config(config) == VolumeShape(8, 32, 24)
    assert VolumeShape.from_config({**config, "fast_decode": True}).fast_decode


def test_an_out_of_range_number_carries_its_setting_and_value():
    with pytest.raises(OptionOutOfRange) as error:
        VolumeShape(8, 0, 8)
    assert (error.value.option, error.value.value, error.value.limit) == ("height", 0, SIZE)
    assert str(error.value) == "`height` must be a whole number >= 1, got 0."


def test_demo_settings_take_their_shape_in_one_value():
    assert DemoSettings(depth=8, width=32).shape == VolumeShape(8, 32, 32)
    settings = DemoSettings(depth=8, width=32, height=24, fast_decode=True, epochs=2).train_settings()
    assert settings.shape == VolumeShape(8, 24, 32, fast_decode=True)


@pytest.mark.parametrize("precision, scans, shape, epochs", [
    ("bf16", 320, VolumeShape(16, 48, 48), 11), ("fp16", 320, VolumeShape(16, 48, 48), 11),
    ("fp32", 480, VolumeShape(16, 32, 32), 5),
])
def test_the_demo_workload_follows_the_precision(precision, scans, shape, epochs):
    """fp32 (no native bf16) trains smaller volumes of more scans for fewer epochs; what the user gives is kept."""
    demo = DemoSettings().with_workload(precision)
    settings = demo.train_settings()
    assert (demo.scans, settings.shape, settings.epochs) == (scans, shape, epochs)
    kept = DemoSettings(scans=40, depth=8, width=24, epochs=3).with_workload(precision)
    assert (kept.scans, kept.shape, kept.epochs) == (40, VolumeShape(8, 24, 24), 3)
    with pytest.raises(Cov3dError, match="with_workload"):
        DemoSettings().train_settings()


def test_the_cli_spells_the_settings_a_message_names_as_its_options():
    from cov3d import cli

    assert cli.phrase("`learning_rate` must be > 0; try `precision=fp32`.", cli.train_command) == (
        "--learning-rate must be > 0; try --precision fp32.")
    assert cli.phrase("or `pretrained=False`, from `data_dir`", cli.train_command) == "or --no-pretrained, from --directory"
    assert cli.phrase("choose another `output_dir`", cli.train_command) == "choose another --output-dir"
    assert cli.phrase("choose another `output_dir`", cli.explain_command) == "choose another --output"
    assert cli.phrase("a smaller `slice_size`, not `weight_decay`", cli.synthetic_command) == "a smaller --slice-size, not weight_decay"
    assert cli.phrase("`output` exists", cli.synthetic_command) == "OUTPUT exists"


def test_cli_defaults_are_the_librarys():
    from cov3d import cli
    from cov3d.inference.infer import infer

    defaults = {name: parameter.default.default for name, parameter in inspect.signature(cli.train_command).parameters.items()
                if hasattr(parameter.default, "default")}
    for field in dataclasses.fields(TrainSettings):
        if field.name in defaults and defaults[field.name] is not None:
            assert defaults[field.name] == getattr(TrainSettings(), field.name), field.name
    library = inspect.signature(infer).parameters
    command = inspect.signature(cli.infer_command).parameters
    for name in ("batch_size", "seed", "workers"):
        assert command[name].default.default == library[name].default, name


def test_infer_chooses_its_own_workers(tiny_run, tmp_path, monkeypatch):
    """Python callers get the command line's default: half the CPU cores, at least 1."""
    import cov3d.inference.infer as infer_module

    asked = []
    monkeypatch.setattr(infer_module, "volume_stream", lambda scans, caches, workers: asked.append(workers) or iter(()))
    infer_module.infer([], tiny_run, tmp_path / "p.csv", cache_dir=tmp_path, device="cpu", progress=False)
    assert asked == [infer_module.default_workers()] and asked[0] >= 1


def test_a_size_is_a_preset_or_d_x_h_x_w():
    assert VolumeShape.parse("large") == PRESETS["large"]
    assert VolumeShape.parse("16x64x48").dims == (16, 64, 48)
    with pytest.raises(Cov3dError, match="DxHxW"):
        VolumeShape.parse("16x64")
