"""The command line as a user meets it: help texts, one-line errors, and the commands end to end."""

import csv

import pytest
from cpu_kinds import BF16_SLICE
from typer.testing import CliRunner

from cov3d.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("preprocess", "train", "infer"):
        assert command in result.output


@pytest.mark.parametrize("command", ["preprocess", "train", "infer"])
def test_every_option_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "--cache-dir" in result.output


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_train_on_a_missing_folder(tmp_path):
    assert_one_line_error(invoke("train", "--directory", tmp_path / "nope", "--no-pretrained"), "nope")


def test_train_without_severity_csv(tmp_path):
    (tmp_path / "train" / "covid").mkdir(parents=True)
    assert_one_line_error(invoke("train", "--directory", tmp_path, "--no-pretrained"), "train_partition_covid_categories.csv")


@pytest.mark.parametrize(("option", "value"), [
    ("--dropout", "1.0"), ("--pool", "median"), ("--presence-averaging", "mean"), ("--warp", "1.5")])
def test_train_rejects_unbuildable_settings_before_reading_data(tmp_path, tiny_dataset, option, value):
    result = invoke("train", "--directory", tiny_dataset, "--cache-dir", tmp_path / "cache", option, value)
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output
    assert option.removeprefix("--") in result.output and not (tmp_path / "cache").exists()


def test_preprocess_without_scans(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("preprocess", tmp_path / "empty"), "empty")


def test_prune_cache_lists_then_removes(tmp_path, tiny_dataset):
    cache = tmp_path / "cache"
    assert invoke("preprocess", tiny_dataset / "test", "--depth", 4, "--width", 16, "--cache-dir", cache).exit_code == 0
    entries = sorted(cache.glob("*/*.pt"))
    damaged = entries[0]
    damaged.write_bytes(damaged.read_bytes()[:2048])  # torn: starts like an entry, cannot be read
    preview = invoke("prune-cache", "--cache-dir", cache, "--dry-run")
    assert preview.exit_code == 0, preview.output
    assert f"Would remove {damaged}: damaged entry" in preview.output
    assert f"1 file to remove (0.0 MiB), {len(entries) - 1} entries kept." in preview.output and damaged.exists()
    result = invoke("prune-cache", "--cache-dir", cache)
    assert result.exit_code == 0 and f"Removed {damaged}: damaged entry" in result.output and not damaged.exists()
    assert_one_line_error(invoke("prune-cache", "--cache-dir", tmp_path / "elsewhere"), "elsewhere", "not found")


def test_an_output_that_cannot_be_made_is_one_line(tmp_path, tiny_dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke("stats", tiny_dataset, "--output", blocker / "stats")
    assert_one_line_error(result, str(blocker / "stats"), "Not a directory", "permissions")


def test_infer_on_missing_folder(tmp_path, tiny_run):
    assert_one_line_error(invoke("infer", tmp_path / "missing", "--model", tiny_run), "missing")


def test_preprocess_then_infer(tmp_path, tiny_dataset, tiny_run):
    cache = tmp_path / "cache"
    result = invoke("preprocess", tiny_dataset / "test", "--depth", 8, "--width", 32, "--cache-dir", cache, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "0 failed" in result.output
    again = invoke("preprocess", tiny_dataset / "test", "--depth", 8, "--width", 32, "--cache-dir", cache, "--workers", 1)
    assert "0 processed" in again.output

    output = tmp_path / "preds.csv"
    result = invoke("infer", tiny_dataset / "test", "--model", tiny_run, "--output", output, "--cache-dir", cache, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with output.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(1 for p in (tiny_dataset / "test").iterdir() if p.is_dir())


def test_infer_with_separate_presence_and_severity_models(tmp_path, tiny_dataset, tiny_run):
    output, submission = tmp_path / "preds.csv", tmp_path / "submission"
    result = invoke("infer", tiny_dataset / "test", "--presence-model", tiny_run, "--severity-model", tiny_run,
                    "--output", output, "--submission-dir", submission, "--cache-dir", tmp_path / "cache", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (submission / "covid.csv").is_file() and (submission / "mild.csv").is_file()
    assert_one_line_error(invoke("infer", tiny_dataset / "test"), "--presence-model")


def test_preprocess_with_the_original_warp(tmp_path, tiny_dataset):
    cache = tmp_path / "cache"
    result = invoke("preprocess", tiny_dataset / "test", "--depth", 4, "--width", 16, "--warp", 0.5,
                    "--cache-dir", cache, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert [folder.name for folder in cache.iterdir()] == ["4x16x16-warp0.5"]
    assert_one_line_error(invoke("preprocess", tiny_dataset / "test", "--warp", 1, "--cache-dir", cache), "warp")


@pytest.mark.slow
def test_train_command_end_to_end(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    result = invoke(
        "train", "--directory", tiny_dataset, "--output-dir", run_dir, "--depth", 8, "--width", BF16_SLICE,
        "--epochs", 1, "--penultimate", 8, "--no-pretrained", "--cache-dir", tmp_path / "cache",
        "--workers", 1, "--device", "cpu", "--precision", "bf16",
    )
    assert result.exit_code == 0, result.output
    assert (run_dir / "config.json").is_file() and (run_dir / "metrics.csv").is_file()
