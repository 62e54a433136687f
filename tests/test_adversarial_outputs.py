"""Issue 16, part A: nothing of the user's is ever lost.

Each case an adversarial user found is a test here, the cases that destroyed data first. A test
checks the refusal (exit code and a one-line error naming the file) and that the victim file is
byte for byte what it was. The module works on its own copies of the tiny dataset and run, so a
failing test damages nothing that other modules read.
"""

import csv
import math
import os
import pickle
import shutil
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cov3d import atomic
from cov3d.cli import app
from cov3d.inference.infer import prediction_columns
from cov3d.settings import VolumeShape

runner = CliRunner()
FAST = ("--device", "cpu", "--precision", "fp32", "--workers", "0", "--no-tta")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one 'Error:' line of a failed command (and no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in paths}


def assert_unchanged(before: dict[Path, bytes]) -> None:
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was changed"


@pytest.fixture(scope="module")
def world(module_dir, tiny_dataset, tiny_run):
    """Copies of the tiny dataset and run (trained once per session), and a cache of their own."""
    data, run = module_dir / "data", module_dir / "run"
    shutil.copytree(tiny_dataset, data)
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("wandb"))
    test_scans = sorted(path for path in (data / "test").iterdir() if path.is_dir())
    return SimpleNamespace(root=module_dir, data=data, run=run, scans=test_scans, cache=module_dir / "cache")


def infer(world, *args):
    return invoke("infer", *args, "--cache-dir", world.cache, *FAST)


def run_files(run: Path) -> dict[Path, bytes]:
    return snapshot(*sorted(path for path in run.iterdir() if path.is_file()))


def scan_copy(world, folder: Path) -> Path:
    """A test's own copy of a test scan, so that a regression damages only that test's files."""
    return Path(shutil.copytree(world.scans[0], folder / "scans" / world.scans[0].name))


def run_copy(world, folder: Path) -> Path:
    """A test's own copy of the run: small files copied, the large weight and checkpoint files
    hard-linked (cov3d only ever replaces those by renaming a new file over them)."""
    run = folder / "run"
    run.mkdir()
    for path in world.run.iterdir():
        if path.is_file():
            (os.link if path.stat().st_size > 2**20 else shutil.copy)(path, run / path.name)
    return run


# Outputs that destroyed inputs or runs ----------------------------------------------------


def test_infer_output_over_a_ct_slice_is_refused(world, tmp_path):
    scan = scan_copy(world, tmp_path)
    victim = scan / "0.jpg"
    before = snapshot(victim)
    for extra in ((), ("--overwrite",)):
        line = error_line(infer(world, scan.parent, "-m", world.run, "-o", victim, *extra))
        assert str(victim) in line and "input folder" in line
    assert_unchanged(before)


def test_infer_output_over_the_runs_config_is_refused(world, tmp_path):
    run = run_copy(world, tmp_path)
    victim = run / "config.json"
    before = run_files(run)
    for extra in ((), ("--overwrite",)):
        line = error_line(infer(world, world.data / "test", "-m", run, "-o", victim, *extra))
        assert str(victim) in line
    assert_unchanged(before)


def test_infer_output_over_a_file_of_another_run_is_refused(world, tmp_path):
    other = tmp_path / "other-run"
    other.mkdir()
    shutil.copy(world.run / "config.json", other)  # a run that this command does not read
    os.link(world.run / "best-presence.safetensors", other / "best-presence.safetensors")
    before = snapshot(other / "config.json")
    line = error_line(infer(world, world.scans[0], "-m", world.run, "-o", other / "config.json", "--overwrite"))
    assert str(other / "config.json") in line and "run" in line
    assert_unchanged(before)


def test_show_output_over_a_ct_slice_is_refused(world, tmp_path):
    scan = scan_copy(world, tmp_path)
    victim = scan / "0.jpg"
    before = snapshot(victim)
    for extra in ((), ("--overwrite",)):
        line = error_line(invoke("show", scan, "-o", victim, *extra))
        assert str(victim) in line
    assert_unchanged(before)


def test_export_into_the_run_it_reads_is_refused(world, tmp_path):
    run = run_copy(world, tmp_path)
    victim = run / "best-presence.safetensors"
    before = run_files(run)
    for extra in ((), ("--overwrite",)):
        line = error_line(invoke("export", run, victim, *extra))
        assert str(victim) in line
    assert_unchanged(before)


def test_train_into_an_existing_run_is_refused(world, tmp_path):
    run = run_copy(world, tmp_path)
    before = run_files(run)
    result = invoke("train", "-d", world.data, "-o", run, "--depth", 8, "--width", 32, "--epochs", 1,
                    "--no-pretrained", "--penultimate", 16, "--cache-dir", world.cache, "--device", "cpu")
    line = error_line(result)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert_unchanged(before)


def test_train_overwrite_removes_the_earlier_runs_weights_first(world, tmp_path):
    """With another lambda the old best-severity weights must not stay beside the new config."""
    run = run_copy(world, tmp_path)
    assert (run / "best-severity.safetensors").is_file()
    result = invoke("train", "-d", world.data, "-o", run, "--depth", 8, "--width", 32, "--epochs", 1,
                    "--no-pretrained", "--penultimate", 16, "--severity-factor", 0, "--overwrite",
                    "--cache-dir", world.cache, "--device", "cpu", "--precision", "fp32", "--workers", 1)
    assert result.exit_code == 0, result.output
    assert f"Replacing the earlier run in {run} (--overwrite)" in result.output
    assert not (run / "best-severity.safetensors").exists()
    from cov3d.model.files import load_source

    source = load_source(run)
    assert set(source.states) == {"presence"} and source.build("presence") is not None


def test_resume_on_a_foreign_file_refuses_before_cutting_it(world, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"a\nb")
    line = error_line(infer(world, world.scans[0], "-m", world.run, "-o", victim, "--resume"))
    assert str(victim) in line
    assert victim.read_bytes() == b"a\nb"


def test_infer_over_a_foreign_file_is_refused_unless_overwrite(world, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"a\nb")
    line = error_line(infer(world, world.scans[0], "-m", world.run, "-o", victim))
    assert str(victim) in line and "--overwrite" in line
    assert victim.read_bytes() == b"a\nb"


def test_prune_cache_keeps_files_named_like_entries_that_are_not(world, tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "16x32x32"
    folder.mkdir(parents=True)
    pickled, text = folder / "notes-0123456789abcdef.pt", folder / "ct_scan_1-fedcba9876543210.pt"
    pickled.write_bytes(pickle.dumps({"the user's": [1, 2, 3]}))
    text.write_text("the user's notes\n")
    empty_temp = folder / ".ct_scan_1-fedcba9876543210.pt.abc123.tmp"
    empty_temp.write_bytes(b"")
    os.utime(empty_temp, (1, 1))  # old enough to look like a killed writer's leftover
    before = snapshot(pickled, text, empty_temp)
    result = invoke("prune-cache", "--cache-dir", cache)
    assert result.exit_code == 0 and "0 files removed" in result.output and "0 entries kept" in result.output, result.output
    assert_unchanged(before)


# Non-finite weights and predictions ------------------------------------------------------


def test_a_model_file_with_non_finite_weights_is_refused_naming_it(world, tmp_path):
    run = tmp_path / "nan-run"
    run.mkdir()
    shutil.copy(world.run / "config.json", run)
    shutil.copy(world.run / "best-severity.safetensors", run)
    state = load_file(str(world.run / "best-presence.safetensors"))
    state["fc.0.bias"][0] = math.nan
    save_file(state, str(run / "best-presence.safetensors"))
    output = tmp_path / "preds.csv"
    line = error_line(infer(world, world.scans[0], "-m", run, "-o", output))
    assert str(run / "best-presence.safetensors") in line and "non-finite" in line
    assert not output.exists()


def test_non_finite_weights_are_never_kept_as_best(tmp_path):
    """A NaN model's severity F1 of 0.25 must not beat, nor be saved before, a real model's 0.0."""
    from cov3d.training.checkpoint import BestCheckpoints

    best = BestCheckpoints(tmp_path, ["presence_f1", "severity_f1"])
    names = ["epoch", "train_loss", "valid_loss", "presence_f1", "severity_f1", "time"]
    diverged = torch.nn.Linear(2, 2)
    with torch.no_grad():
        diverged.weight.fill_(math.nan)
    best.learn = SimpleNamespace(model=diverged, epoch=0, recorder=SimpleNamespace(
        metric_names=names, log=[0, math.nan, math.nan, 0.33, 0.25, "00:01"]))
    best.after_epoch()
    assert not list(tmp_path.iterdir()) and best.best == {"presence_f1": -math.inf, "severity_f1": -math.inf}
    best.learn = SimpleNamespace(model=torch.nn.Linear(2, 2), epoch=1, recorder=SimpleNamespace(
        metric_names=names, log=[1, 0.7, 0.7, 0.2, 0.0, "00:01"]))
    best.after_epoch()
    assert best.best == {"presence_f1": 0.2, "severity_f1": 0.0}
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "best-severity.safetensors")).values())


def test_a_non_finite_prediction_is_an_error_for_its_scan_not_a_class(world, tmp_path):
    """Finite but huge weights make the head overflow: inf * (weights of both signs) -> NaN."""
    run = run_copy(world, tmp_path)
    (run / "best-presence.safetensors").unlink()  # a link to the module's run: write a file of its own
    state = load_file(str(world.run / "best-presence.safetensors"))
    state["fc.0.weight"].fill_(3e38)
    save_file(state, str(run / "best-presence.safetensors"))
    output = tmp_path / "preds.csv"
    result = infer(world, world.data / "test", "-m", run, "-o", output)
    assert result.exit_code == 1
    for scan in world.scans:
        assert f"Failed {scan}: the model gave a non-finite prediction" in result.output
    rows = list(csv.reader(output.open()))
    assert rows == [list(prediction_columns(uncertainty=False))] and "nan" not in output.read_text()


# Scans told apart by their resolved paths; names that cannot go into a submission --------


def test_resume_with_the_folder_spelled_absolute_predicts_nothing_twice(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world.root)
    output, submission = tmp_path / "preds.csv", tmp_path / "submission"
    first = infer(world, "data/test", "-m", "run", "-o", output, "--submission-dir", submission)
    assert first.exit_code == 0, first.output
    before = snapshot(output, *sorted(submission.glob("*.csv")))
    again = infer(world, world.root / "data" / "test", "-m", world.run, "-o", output, "--resume",
                  "--submission-dir", submission)
    assert again.exit_code == 0 and f"0 scans predicted (0 with COVID-19), {len(world.scans)} already in the CSV" in again.output
    assert_unchanged(before)
    listed = [line for path in submission.glob("*covid.csv") for line in path.read_text().splitlines()]
    assert sorted(listed) == sorted(scan.name for scan in world.scans)


def test_a_scan_name_with_a_newline_is_refused_and_the_others_go_on(world, tmp_path):
    scans = tmp_path / "scans"
    shutil.copytree(world.scans[0], scans / "ct_scan_9\nct_scan_10")
    shutil.copytree(world.scans[1], scans / world.scans[1].name)
    output, submission = tmp_path / "preds.csv", tmp_path / "submission"
    result = infer(world, scans, "-m", world.run, "-o", output, "--submission-dir", submission)
    assert result.exit_code == 1
    assert "cannot be written in a submission file: it holds the control character '\\n'" in result.output
    rows = list(csv.DictReader(output.open()))
    assert [row["name"] for row in rows] == [world.scans[1].name]
    listed = [line for path in submission.glob("*covid.csv") for line in path.read_text().splitlines()]
    assert listed == [world.scans[1].name]


# Files keep the user's umask; stale slices are noticed ------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomically_written_files_get_the_users_umask(tmp_path, world, mask):
    from cov3d.preprocessing.preprocess import VolumeCache
    from cov3d.viz.figures import save_figure, training_curves

    def forget_umask():  # cov3d reads the umask once per process
        if hasattr(atomic, "file_mode"):
            atomic.file_mode.cache_clear()

    old = os.umask(mask)
    forget_umask()
    try:
        text = tmp_path / "config.json"
        atomic.write_text_atomically(text, "{}", "free some space")
        figure = save_figure(training_curves({"train_loss": [1.0, 0.5]}), tmp_path / "curves.png")
        cache = VolumeCache(tmp_path / "cache", VolumeShape(4, 16, 16))
        cache.update(world.scans[0])
        for path in (text, figure, cache.path_for(world.scans[0])):
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    finally:
        os.umask(old)
        forget_umask()


def test_a_slice_replaced_by_a_file_of_the_same_size_and_time_is_rebuilt(world, tmp_path):
    from PIL import Image

    from cov3d.preprocessing.preprocess import VolumeCache

    scan = tmp_path / world.scans[0].name
    shutil.copytree(world.scans[0], scan)
    cache = VolumeCache(tmp_path / "cache", VolumeShape(4, 16, 16))
    stale = cache.levels(scan).clone()
    victim = scan / "0.jpg"
    old = victim.stat()
    Image.new("L", Image.open(victim).size, 255).save(tmp_path / "white.jpg")
    white = (tmp_path / "white.jpg").read_bytes()
    assert len(white) <= old.st_size
    time.sleep(0.02)  # past the kernel's timestamp tick (1-10 ms on older kernels): the change time must move
    victim.write_bytes(white + b"\0" * (old.st_size - len(white)))  # padding after the JPEG's end
    os.utime(victim, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    fresh = cache.levels(scan)
    assert not torch.equal(fresh, stale)
    assert torch.equal(fresh, VolumeCache(tmp_path / "new-cache", VolumeShape(4, 16, 16)).levels(scan))


# The other figure and file outputs ---------------------------------------------------------


def test_stats_output_keeps_a_users_file_and_replaces_its_own(world, tmp_path):
    out = tmp_path / "stats"
    out.mkdir()
    victim = out / "scans.csv"
    victim.write_text("my,own,table\n")
    before = snapshot(victim)
    assert str(victim) in error_line(invoke("stats", world.data, "-o", out))
    assert_unchanged(before)
    victim.unlink()
    assert invoke("stats", world.data, "-o", out).exit_code == 0
    again = invoke("stats", world.data, "-o", out)
    assert again.exit_code == 0 and f"Replacing earlier stats files in {out}" in again.output
    assert str(world.scans[0]) in error_line(invoke("stats", world.data, "-o", world.scans[0], "--overwrite"))


def test_explain_output_keeps_a_users_file(world, tmp_path):
    out = tmp_path / "explain"
    out.mkdir()
    victim = out / f"{world.scans[0].name}-gradcam.png"
    victim.write_bytes(b"my picture")
    before = snapshot(victim)
    args = ("explain", world.scans[0], "-m", world.run, "--cache-dir", world.cache, "--device", "cpu")
    assert str(victim) in error_line(invoke(*args, "-o", out))
    assert_unchanged(before)
    assert str(world.run) in error_line(invoke(*args, "-o", world.run, "--overwrite"))


def test_submission_dir_keeps_a_users_file(world, tmp_path):
    submission = tmp_path / "submission"
    submission.mkdir()
    victim = submission / "covid.csv"
    victim.write_text("my list\n")
    before = snapshot(victim)
    output = tmp_path / "preds.csv"
    line = error_line(infer(world, world.scans[0], "-m", world.run, "-o", output, "--submission-dir", submission))
    assert str(victim) in line and "--overwrite" in line
    assert_unchanged(before)
    assert not output.exists()


def test_show_keeps_a_users_image_and_replaces_its_own_figure(world, tmp_path):
    victim = tmp_path / "holiday.png"
    shutil.copy(world.scans[0] / "0.jpg", victim)
    before = snapshot(victim)
    assert str(victim) in error_line(invoke("show", world.scans[0], "-o", victim))
    assert_unchanged(before)
    figure = tmp_path / "scans.png"
    assert invoke("show", world.scans[0], "-o", figure).exit_code == 0
    again = invoke("show", world.scans[0], "-o", figure)
    assert again.exit_code == 0 and f"Replacing earlier figure {figure}" in again.output
    forced = invoke("show", world.scans[0], "-o", victim, "--overwrite")
    assert forced.exit_code == 0 and f"Replacing {victim} (--overwrite)" in forced.output


def test_an_earlier_predictions_csv_is_replaced_with_a_notice(world, tmp_path):
    output = tmp_path / "preds.csv"
    assert infer(world, world.scans[0], "-m", world.run, "-o", output).exit_code == 0
    again = infer(world, world.scans[0], "-m", world.run, "-o", output)
    assert again.exit_code == 0 and f"Replacing earlier predictions CSV {output}" in again.output
    assert len(list(csv.DictReader(output.open()))) == 1
