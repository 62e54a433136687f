"""A second round of adversarial inputs (issue 27): volumes without data, processes left behind by a
kill, closed pipes and ASCII consoles, ambiguous slice numbers, and restart advice that leads
somewhere. Each class ends in a one-line error or a working command; tests with real kills are slow."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.dataset.dicom_nifti import NON_FINITE_REMEDY
from cov3d.dataset.scans import scan_number
from cov3d.errors import Cov3dError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("Error:") or line.startswith("Failed ")]


def grey_jpeg(path: Path, level: int, size: int = 32) -> None:
    Image.fromarray(np.full((size, size), level, dtype=np.uint8)).save(path)


# Ambiguous slice numbers: 05.jpg and 5.jpg are both slice 5.

@pytest.fixture
def ambiguous_data(tmp_path) -> Path:
    """A folder of two scans: ct_scan_1 holds 0.jpg..5.jpg and also 05.jpg; ct_scan_2 is clean."""
    data = tmp_path / "data"
    for name in ("ct_scan_1", "ct_scan_2"):
        scan = data / name
        scan.mkdir(parents=True)
        for index in range(6):
            grey_jpeg(scan / f"{index}.jpg", 40 * index)
    grey_jpeg(data / "ct_scan_1" / "05.jpg", 255)
    return data


def test_two_files_of_one_slice_number_fail_their_scan_and_stats_reports_them(tmp_path, ambiguous_data):
    result = invoke("preprocess", ambiguous_data, "--cache-dir", tmp_path / "cache", "--workers", "1",
                    "--depth", "4", "--width", "16")
    assert result.exit_code == 1, result.output
    [failed] = error_lines(result.output)
    scan = ambiguous_data / "ct_scan_1"
    assert f"{scan / '05.jpg'} and {scan / '5.jpg'} have the same slice number 5" in failed, failed
    assert "1 processed, 0 up to date, 1 failed" in result.output  # the clean scan is not lost

    result = invoke("stats", ambiguous_data, "-o", tmp_path / "stats")
    assert result.exit_code == 0, result.output
    warnings = (tmp_path / "stats" / "warnings.txt").read_text().splitlines()
    assert warnings == [f"duplicate slice numbers: {scan / '05.jpg'} and {scan / '5.jpg'} have the same slice "
                        "number 5: the slice order is ambiguous. Remove or renumber one of each pair."]


# Volumes without data: NaN or infinite voxels are refused per scan, by preprocess, infer and show alike.

@pytest.fixture
def non_finite_volumes(tmp_path) -> Path:
    """Three NIfTI volumes (16, 16, 6) in HU: all NaN, 3 voxels NaN or infinite, and a clean one."""
    nibabel = pytest.importorskip("nibabel")
    data = tmp_path / "volumes"
    data.mkdir()
    hu = np.linspace(-1000.0, 200.0, 16 * 16 * 6, dtype=np.float32).reshape(16, 16, 6)
    holed = hu.copy()
    holed[0, 0, 0], holed[3, 4, 5], holed[7, 7, 2] = np.nan, np.inf, -np.inf
    for name, volume in (("all-nan", np.full_like(hu, np.nan)), ("holed", holed), ("clean", hu)):
        nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), data / f"{name}.nii.gz")
    return data


def test_non_finite_voxels_fail_their_scan_without_a_library_warning(tmp_path, non_finite_volumes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would fail the command with a traceback
        result = invoke("preprocess", non_finite_volumes, "--cache-dir", tmp_path / "cache", "--workers", "1",
                        "--depth", "4", "--width", "16")
    assert result.exit_code == 1, result.output
    assert "Warning" not in result.output, result.output
    assert error_lines(result.output) == [
        f"Failed {non_finite_volumes / 'all-nan.nii.gz'}: {non_finite_volumes / 'all-nan.nii.gz'}: all 1,536 voxels "
        f"are not finite (NaN or infinity). {NON_FINITE_REMEDY}",
        f"Failed {non_finite_volumes / 'holed.nii.gz'}: {non_finite_volumes / 'holed.nii.gz'}: 3 of 1,536 voxels "
        f"are not finite (NaN or infinity). {NON_FINITE_REMEDY}",
    ]
    assert "1 processed, 0 up to date, 2 failed" in result.output

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = invoke("show", non_finite_volumes / "holed.nii.gz", "-o", tmp_path / "holed.png")
    assert result.exit_code == 1 and error_lines(result.output) == [
        f"Error: {non_finite_volumes / 'holed.nii.gz'}: 3 of 1,536 voxels are not finite (NaN or infinity). "
        f"{NON_FINITE_REMEDY}"], result.output
    assert not (tmp_path / "holed.png").exists()


def test_infer_predicts_no_volume_without_data(tmp_path, tiny_run, non_finite_volumes):
    output = tmp_path / "predictions.csv"
    result = invoke("infer", non_finite_volumes, "-m", tiny_run, "-o", output, "--workers", "0", "--cache-dir",
                    tmp_path / "cache", "--device", "cpu", "--no-tta")
    assert result.exit_code == 1, result.output
    assert "voxels are not finite" in result.output and "RuntimeWarning" not in result.output
    with output.open(newline="") as handle:
        assert [Path(row["path"]).name for row in csv.DictReader(handle)] == ["clean.nii.gz"]


def test_a_dicom_slice_with_a_non_finite_rescale_fails_its_scan(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from cov3d.dataset.dicom_nifti import scan_sources
    from cov3d.preprocessing.preprocess import preprocess_scan

    series = tmp_path / "series"
    series.mkdir()
    for index in range(3):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.ImagePositionPatient = [0.0, 0.0, 5.0 * index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns that 'inf' is not a valid decimal string
            if index == 1:
                dataset.RescaleSlope = "inf"
            dataset.save_as(series / f"IM{index}.dcm")
    bad = scan_sources(series).files[1]
    assert bad.name == "IM1.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Cov3dError) as error:
            preprocess_scan(series, 4, 16, 16)
    assert str(error.value).startswith(f"{bad}: ") and "voxels are not finite" in str(error.value)


# Nothing left running: workers (and their fork server) end when the command is killed.

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from cov3d.cli import app; app()"]
SETTLE_S = 10.0
"""How long the killed command's processes get to end."""


def session_processes(session: int) -> list[int]:
    """The processes of session ``session`` (a command started with ``start_new_session``), zombies excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def noise_scans(data: Path, scans: int, slices: int) -> Path:
    """Scan folders of 256x256 noise slices (slow enough to decode that workers are busy when killed)."""
    rng = np.random.default_rng(0)
    for scan in range(scans):
        folder = data / f"ct_scan_{scan}"
        folder.mkdir(parents=True)
        for index in range(slices):
            Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(folder / f"{index}.jpg")
    return data


def assert_nothing_left_after_sigkill(arguments: list[str], cwd: Path, running: int) -> None:
    """Start ``arguments`` in a session of its own, wait until ``running`` processes belong to it, SIGKILL the
    command alone and check that every process of the session ends within ``SETTLE_S``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = subprocess.Popen(arguments, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(session_processes(command.pid)) >= running, 120), session_processes(command.pid)
        os.kill(command.pid, signal.SIGKILL)
        assert command.wait(10) == -signal.SIGKILL  # killed while its workers ran, not finished
        assert wait_for(lambda: not session_processes(command.pid), SETTLE_S), "left running after the kill"
    finally:
        for pid in session_processes(command.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_preprocess_leaves_no_worker_or_fork_server(tmp_path):
    data = noise_scans(tmp_path / "data", scans=12, slices=40)
    # the command, the resource tracker, the fork server and its two workers
    assert_nothing_left_after_sigkill([*CLI, "preprocess", str(data), "--workers", "2", "--cache-dir",
                                       str(tmp_path / "cache"), "--depth", "64", "--width", "256"], tmp_path, 5)


STREAM_AND_WAIT = """
import time
from pathlib import Path
from cov3d.inference.streaming import volume_stream
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.settings import VolumeShape
from cov3d.dataset.scans import find_scans
shape = VolumeShape(64, 256, 256)
for item in volume_stream(find_scans([Path("data")]), {shape: VolumeCache(Path("cache"), shape)}, workers=2):
    time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_streaming_inference_leaves_no_loader_worker(tmp_path):
    noise_scans(tmp_path / "data", scans=8, slices=30)
    assert_nothing_left_after_sigkill([sys.executable, "-c", STREAM_AND_WAIT], tmp_path, 5)


# Pipes and consoles: a closed standard output loses no file; a console without Unicode gets ASCII.

@pytest.fixture
def unlabelled_test_split(tmp_path, tiny_dataset) -> Path:
    """The tiny dataset without the test split's answer key: stats shows its unknown counts as an en dash."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns("test_labels.csv"))
    return data


def run_cli(arguments: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *arguments], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_stats_writes_its_files_when_standard_output_is_closed(tmp_path, unlabelled_test_split):
    command = run_cli(["stats", str(unlabelled_test_split), "-o", "out"], tmp_path)
    command.stdout.close()  # the reader is gone before the command prints anything, like `| head -0`
    stderr = command.stderr.read().decode()
    assert command.wait(120) == 0, stderr
    assert "Error" not in stderr and "Traceback" not in stderr, stderr
    from cov3d.dataset.stats import STATS_FILES

    assert all((tmp_path / "out" / name).stat().st_size > 0 for name in STATS_FILES.values() if name != "warnings.txt")


def test_stats_on_an_ascii_console_spells_the_en_dash(tmp_path, unlabelled_test_split):
    command = run_cli(["stats", str(unlabelled_test_split), "-o", "out"], tmp_path, PYTHONIOENCODING="ascii")
    stdout, stderr = command.communicate(timeout=120)
    assert command.returncode == 0, stderr.decode()
    table = stdout.decode("ascii")  # nothing but ASCII reached the console
    [covid_row] = [line for line in table.splitlines() if line.startswith("| covid ")]
    assert covid_row.endswith(" |    - |"), table  # the test split's unknown count, an en dash in Unicode
    assert "Traceback" not in stderr.decode()


# Restart advice that leads somewhere: a run that never finished an epoch is started again by the same
# command or by --resume; a run that cannot be continued is never sent to --resume.

def unfinished_run(tmp_path: Path, data: Path, pretrained: str | None = "kinetics-400") -> Path:
    """A run folder as a run killed in its first epoch leaves it: config.json, no checkpoint, no weights."""
    from cov3d.settings import VolumeShape
    from cov3d.training.train import TrainSettings, write_config

    run = tmp_path / "run"
    run.mkdir()
    settings = TrainSettings(shape=VolumeShape(8, 32, 32), epochs=1, penultimate=8)
    write_config(run, settings, {"data_dir": str(data), "pretrained": pretrained,
                                 "arguments": {"cache_dir": str(tmp_path / "cache"), "precision": "fp32", "device": "cpu"}})
    return run


def test_a_run_that_never_finished_an_epoch_restarts_by_either_command(tmp_path, tiny_dataset, monkeypatch, capsys):
    from cov3d.runfiles import CONFIG_FILE, RESUME_FILE, WEIGHTS_FILES
    from cov3d.training import train as training
    from cov3d.training.runconfig import check_new_run, remove_run_files

    run = unfinished_run(tmp_path, tiny_dataset)
    (run / "notes.txt").write_text("mine")
    earlier = check_new_run(run, overwrite=False)  # the same command again: no refusal
    assert [path.name for path in earlier] == [CONFIG_FILE]
    remove_run_files(run, earlier)
    assert f"Replacing the earlier run in {run} (it had not finished an epoch): removed {CONFIG_FILE}" in capsys.readouterr().err
    assert [path.name for path in run.iterdir()] == ["notes.txt"]

    (tmp_path / "second").mkdir()
    run = unfinished_run(tmp_path / "second", tiny_dataset)
    started = {}
    monkeypatch.setattr(training, "train", lambda data, run_dir, settings, **options: started.update(
        data=data, run_dir=run_dir, epochs=settings.epochs, **options))
    training.resume_training(run)  # --resume: starts it again from its config, instead of "checkpoint.pth not found"
    assert started["data"] == tiny_dataset and started["run_dir"] == run and started["epochs"] == 1
    assert "resume" not in started and started["pretrained"] is True and started["pretrained_weights"] is None
    assert (started["precision"], started["device"], started["cache_dir"]) == ("fp32", "cpu", str(tmp_path / "second" / "cache"))

    (run / WEIGHTS_FILES["presence"]).write_bytes(b"weights")  # a run that kept weights but lost its checkpoint
    with pytest.raises(Cov3dError) as refused:
        check_new_run(run, overwrite=False)
    assert "--resume" not in str(refused.value) and f"cannot be continued (no {RESUME_FILE})" in str(refused.value)
    monkeypatch.undo()
    result = invoke("train", "--resume", run)
    [line] = error_lines(result.output)
    assert line == (f"Error: {run / RESUME_FILE} not found: the run in {run} cannot be continued. Run the 'cov3d train' "
                    "command that started it again with --overwrite (its weights are replaced) or with another --output-dir.")


def test_explain_refuses_bad_inputs_in_one_line(tmp_path, tiny_run, tiny_dataset, non_finite_volumes, ambiguous_data):
    scan = ambiguous_data / "ct_scan_1"
    first_scan = min((tiny_dataset / "test").iterdir(), key=lambda path: scan_number(path.name))
    for given, expected in (
        (non_finite_volumes / "all-nan.nii.gz", "all 1,536 voxels are not finite (NaN or infinity)"),
        (scan, f"{scan / '05.jpg'} and {scan / '5.jpg'} have the same slice number 5"),
        (tiny_run, f"{tiny_run} is a cov3d run folder, not a scan"),
        (tiny_dataset / "test", f"{tiny_dataset / 'test'} is not one scan but a folder of"),
    ):
        result = invoke("explain", given, "-m", tiny_run, "-o", tmp_path / "explain", "--cache-dir", tmp_path / "cache",
                        "--device", "cpu")
        assert result.exit_code == 1 and expected in error_lines(result.output)[0], result.output
    assert f"(such as {first_scan})" in error_lines(result.output)[0]
    assert not (tmp_path / "explain").exists()


@pytest.mark.slow
def test_a_train_killed_before_its_first_checkpoint_restarts_with_the_same_command(tmp_path, tiny_dataset):
    from cov3d.runfiles import CONFIG_FILE, RESUME_FILE

    run = tmp_path / "run"
    command = [*CLI, "train", "-d", str(tiny_dataset), "-o", str(run), "--depth", "8", "--width", "32", "--epochs", "1",
               "--no-pretrained", "--penultimate", "8", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
               "--precision", "fp32", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (run / CONFIG_FILE).is_file(), 300)
    finally:
        killed.kill()
    killed.wait(10)
    assert not (run / RESUME_FILE).exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Replacing the earlier run in {run} (it had not finished an epoch)" in again.stderr
    assert (run / RESUME_FILE).is_file()
