"""Every command that preprocesses scans speaks the same size language: the same options give the
same ``VolumeShape`` (and so the same cache folder) in preprocess, train, demo and show."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.settings import VolumeShape

runner = CliRunner()

SAME_EVERYWHERE = [
    (["--size", "small"], VolumeShape(64, 128, 128)),
    (["--size", "medium"], VolumeShape(128, 256, 256)),
    (["--size", "large"], VolumeShape(160, 320, 320)),
    (["--width", "256"], VolumeShape(128, 256, 256)),  # D = W / 2, H = W
    (["--depth", "160", "--width", "320"], VolumeShape(160, 320, 320)),
    (["--depth", "8", "--width", "32"], VolumeShape(8, 32, 32)),
    (["--width", "32", "--height", "24"], VolumeShape(16, 24, 32)),
    (["--depth", "8"], VolumeShape(8, 128, 128)),  # the width of small
    (["--size", "medium", "--fast-decode"], VolumeShape(128, 256, 256, fast_decode=True)),
    (["--width", "64", "--fast-decode"], VolumeShape(32, 64, 64, fast_decode=True)),
]
"""Options and the shape every command gives them."""

WITHOUT_OPTIONS = {"preprocess": VolumeShape(64, 128, 128), "train": VolumeShape(64, 128, 128), "demo": "workload", "show": None}
"""Each command's shape when no size option is given (show: scans at their display size; demo: left to the
workload of the precision in use, ``DemoSettings.with_workload``)."""


@pytest.fixture
def shape_of(monkeypatch, tmp_path):
    """Run a command with size options and return the shape it passed to the library (nothing runs)."""
    import cov3d.dataset.scans
    import cov3d.inference.views
    import cov3d.preprocessing.workers
    import cov3d.training.train
    import cov3d.workflows.demo
    from cov3d.workflows.demo import DemoReport

    seen = []

    def preprocess_many(scans, cache, **_):
        seen.append(cache.shape)
        return SimpleNamespace(processed=0, skipped=0, failed=[])

    def train(data_dir, run_dir, settings, **_):
        seen.append(settings.shape)
        return SimpleNamespace(run_dir=run_dir, best_scores={})

    def run_demo(output, settings, **_):
        seen.append("workload" if settings.depth is None and settings.width is None else settings.shape)
        return DemoReport()

    def show_scans(paths, output, *, shape=None, **_):
        seen.append(shape)
        return []

    monkeypatch.setattr(cov3d.dataset.scans, "find_scans", lambda paths: [])
    monkeypatch.setattr(cov3d.preprocessing.workers, "preprocess_many", preprocess_many)
    monkeypatch.setattr(cov3d.training.train, "train", train)
    monkeypatch.setattr(cov3d.workflows.demo, "run_demo", run_demo)
    monkeypatch.setattr(cov3d.inference.views, "show_scans", show_scans)
    base = {
        "preprocess": ["preprocess", str(tmp_path)],
        "train": ["train", "--directory", str(tmp_path), "--no-pretrained"],
        "demo": ["demo", "--output", str(tmp_path / "demo")],
        "show": ["show", str(tmp_path)],
    }

    def run(command: str, options: list[str]) -> VolumeShape | None:
        seen.clear()
        result = runner.invoke(app, base[command] + options)
        assert result.exit_code == 0, result.output
        assert len(seen) == 1
        return seen[0]

    return run


@pytest.mark.parametrize("command", WITHOUT_OPTIONS)
@pytest.mark.parametrize(("options", "shape"), SAME_EVERYWHERE, ids=[" ".join(o) for o, _ in SAME_EVERYWHERE])
def test_the_same_options_give_the_same_shape_in_every_command(shape_of, command, options, shape):
    assert shape_of(command, options) == shape


@pytest.mark.parametrize("command", WITHOUT_OPTIONS)
def test_the_default_shape_of_each_command(shape_of, command):
    assert shape_of(command, []) == WITHOUT_OPTIONS[command]


def test_a_fast_decoded_cache_is_the_one_training_reads(shape_of, tmp_path):
    options = ["--depth", "8", "--width", "32", "--fast-decode"]
    preprocessed, trained = shape_of("preprocess", options), shape_of("train", options)
    scan = tmp_path / "scan"
    scan.mkdir()
    Image.new("L", (4, 4)).save(scan / "0.jpg")
    assert VolumeCache(tmp_path, preprocessed).path_for(scan) == VolumeCache(tmp_path, trained).path_for(scan)
    assert VolumeCache(tmp_path, trained).path_for(scan).parent.name == "8x32x32-fast"


@pytest.mark.parametrize("command", WITHOUT_OPTIONS)
@pytest.mark.parametrize(("options", "fragments"), [
    (["--size", "huge"], ["Unknown size 'huge'", "small (64x128x128)"]),
    (["--size", "small", "--depth", "8"], ["--size", "--depth/--height/--width", "not both"]),
    (["--width", "0"], ["--width", "must be"]),
])
def test_size_mistakes_are_the_same_one_line_error_everywhere(shape_of, command, options, fragments):
    base = {"preprocess": ["preprocess", "."], "train": ["train", "--directory", ".", "--no-pretrained"],
            "demo": ["demo", "--output", "never-made"], "show": ["show", "."]}[command]
    result = runner.invoke(app, base + options)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0]
    assert not Path("never-made").exists()
