"""Issue 27, second round of adversarial trials: what cov3d writes.

One test per class: one writer per output (a second is refused, naming the holder; a killed holder
leaves no stale lock), a resumed CSV stays one ensemble's, an ensemble counts each model once, and a
full disk leaves nothing that blocks the retry. Then what the issue had not yet tried: read-only
output folders, and pruning the cache while others write it.

The models here are untrained (random weights, presence only), so no test trains anything.
"""

import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_checks import error_line, invoke
from PIL import Image
from safetensors.torch import save_file

from cov3d import atomic, locks
from cov3d.inference.ensemble import Ensemble
from cov3d.locks import lock_path
from cov3d.model.files import export_model, load_source
from cov3d.model.network import build_model
from cov3d.preprocessing.cache import prune_cache
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runfiles import WEIGHTS_FILES, predictions_record
from cov3d.settings import VolumeShape

SIZE = (8, 32, 32)
FAST = ("--device", "cpu", "--precision", "fp32", "--workers", "0")


def make_run(folder: Path, seed: int) -> Path:
    """An untrained presence-only run (lambda = 0): config.json and random r3d_18 weights."""
    folder.mkdir(parents=True)
    depth, height, width = SIZE
    config = {"depth": depth, "height": height, "width": width, "outputs": 1, "penultimate": 8, "dropout": 0.5,
              "pool": "max", "final_bias": False, "severity_factor": 0.0}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    state = build_model(outputs=1, penultimate=8).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / WEIGHTS_FILES["presence"]))
    return folder


def make_scan(folder: Path, seed: int) -> Path:
    """A JPEG scan folder of four 32x32 slices."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"{index}.jpg")
    return folder


@pytest.fixture(scope="module")
def world(module_dir):
    """Two runs (run_b's parent folder holds only it), four scans and a cache, shared by the module."""
    scans = [make_scan(module_dir / "scans" / f"ct_scan_{index}", index) for index in range(4)]
    run_a = make_run(module_dir / "runs" / "run_a", seed=1)
    run_b = make_run(module_dir / "parent" / "run_b", seed=2)
    return SimpleNamespace(root=module_dir, scans=scans, scan_root=module_dir / "scans", run_a=run_a, run_b=run_b,
                           cache=module_dir / "cache")


def infer(world, output, *args):
    return invoke("infer", *args, "-o", output, "--cache-dir", world.cache, *FAST)


def probabilities(path: Path) -> dict[str, float]:
    with path.open(newline="") as handle:
        return {row["name"]: float(row["covid_probability"]) for row in csv.DictReader(handle)}


@contextlib.contextmanager
def lock_held_elsewhere(output: Path):
    """Another process holding the output's lock (``cov3d.locks.writing``) until it is killed."""
    code = ("import sys; from cov3d.locks import writing; held = writing(sys.argv[1]); held.__enter__(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# 1. One writer per output ----------------------------------------------------------------


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(world, tmp_path, monkeypatch):
    """Each kind of output (predictions CSV, submission folder, run folder, export, stats and Grad-CAM
    folders): while another process writes it, a command is refused in one line naming the output and
    the holder's PID (commands that write for a moment wait for it first: here 0.2 s); once the holder
    is killed (SIGKILL), the same command succeeds. A brief writer waiting for its output gets it when
    the holder dies."""
    monkeypatch.setattr(locks, "SHORT_WRITE_WAIT_SECONDS", 0.2)
    export = tmp_path / "model.safetensors"
    commands = {
        tmp_path / "preds.csv": ("infer", world.scan_root, "-m", world.run_a, "-o", tmp_path / "preds.csv",
                                 "--cache-dir", world.cache, *FAST),
        tmp_path / "submission": ("infer", world.scan_root, "-m", world.run_a, "-o", tmp_path / "other.csv",
                                  "--submission-dir", tmp_path / "submission", "--cache-dir", world.cache, *FAST),
        tmp_path / "run": ("train", "--directory", tmp_path / "no-data", "-o", tmp_path / "run", "--device", "cpu"),
        export: ("export", world.run_a, export),
        tmp_path / "stats": ("stats", world.scan_root, "-o", tmp_path / "stats"),
        tmp_path / "explain": ("explain", world.scans[0], "-m", world.run_a, "-o", tmp_path / "explain",
                               "--cache-dir", world.cache, "--device", "cpu", "--precision", "fp32"),
    }
    for output, command in commands.items():
        with lock_held_elsewhere(output) as holder:
            refused = invoke(*command)
            error_line(refused, str(output), "being written by another cov3d process", f"PID {holder.pid}")
        assert lock_path(output).exists()  # the killed holder's lock file stays, without its lock
        if output.name == "run":  # train, unlocked, now fails on its missing data instead
            assert "no-data" in error_line(invoke(*command))
            continue
        assert invoke(*command).exit_code == 0, output
        assert not lock_path(output).exists()  # removed by the writer that held it last
    assert (tmp_path / "submission" / "covid.csv").exists() or (tmp_path / "submission" / "non-covid.csv").exists()
    monkeypatch.setattr(locks, "SHORT_WRITE_WAIT_SECONDS", 60.0)
    with lock_held_elsewhere(tmp_path / "stats") as holder:
        waited = time.monotonic()  # before the timer starts counting its second
        threading.Timer(1.0, holder.kill).start()
        assert invoke(*commands[tmp_path / "stats"]).exit_code == 0
        assert 1.0 <= time.monotonic() - waited < 30


def test_two_spellings_of_an_output_share_one_lock(tmp_path):
    (tmp_path / "outputs").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "outputs")
    assert lock_path(tmp_path / "outputs" / "run1") == lock_path(link / "." / "run1") == lock_path(tmp_path / "outputs" / "run1/")
    assert lock_path(tmp_path / "outputs" / "run1").name == ".run1.cov3d-lock"
    longest = "m" * 255  # a name of the most bytes a file system takes still gets a lock file it can make
    assert lock_path(tmp_path / longest).name == f".{hashlib.sha256(longest.encode()).hexdigest()}.cov3d-lock"
    with locks.writing(tmp_path / longest):
        assert lock_path(tmp_path / longest).exists()
    target = tmp_path / "outputs" / "run1"
    with locks.writing(target), locks.writing(link / "run1"):  # re-entrant within one process
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert not lock_path(target).exists()
    # Another holder (another open file of the lock, as another process has) refuses a writer, naming it.
    foreign = os.open(lock_path(target), os.O_RDWR | os.O_CREAT)
    fcntl.flock(foreign, fcntl.LOCK_EX)
    os.write(foreign, json.dumps({"pid": 4242, "host": "node7", "started": 0, "command": "cov3d train"}).encode())
    with pytest.raises(locks.OutputBusy, match=r"run1 is being written by another cov3d process "
                                               r"\(PID 4242 on node7, since 1970-01-01 00:00:00 UTC: cov3d train\)"):
        with locks.writing(link / "run1"):
            pass
    os.close(foreign)  # the holder ends: its lock goes with it
    with locks.writing(link / "run1"):
        pass


# 2. A resumed CSV stays one ensemble's ---------------------------------------------------


def test_resume_with_other_models_or_settings_is_refused_and_the_same_ensemble_continues(world, tmp_path):
    preds = tmp_path / "preds.csv"
    assert infer(world, preds, *world.scans[:2], "-m", world.run_a).exit_code == 0
    record = json.loads(predictions_record(preds).read_text())
    assert [member["sha256"] for member in record["members"]] == [load_source(world.run_a).digest]
    before = preds.read_bytes()
    for changed in (("-m", world.run_b), ("-m", world.run_a, "--no-tta"), ("-m", world.run_a, "--window", "-600,1500"),
                    ("--presence-model", world.run_a), ("-m", world.run_a, "--uncalibrated"), ("-m", world.run_a, "--skip-flagged")):
        line = error_line(infer(world, preds, world.scan_root, *changed, "--resume"), str(preds), "begun by other models",
                          str(predictions_record(preds)), "without --resume")
        assert ("TTA was on, now off" in line) == ("--no-tta" in changed)
        assert ("were calibrated, now uncalibrated" in line) == ("--uncalibrated" in changed)
        assert ("flagged scans were kept, now left out" in line) == ("--skip-flagged" in changed)
        assert preds.read_bytes() == before, changed
    # The same model, spelled otherwise (a relative path through its parent), continues the CSV.
    spelled = Path(os.path.relpath(world.run_a, Path.cwd()))
    resumed = infer(world, preds, world.scan_root, "-m", spelled.parent / ".." / "runs" / "run_a", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "2 scans predicted" in resumed.output and "2 already in the CSV" in resumed.output
    # Without --resume another model starts the CSV again, and its record with it.
    assert infer(world, preds, world.scan_root, "-m", world.run_b).exit_code == 0
    assert json.loads(predictions_record(preds).read_text())["members"][0]["sha256"] == load_source(world.run_b).digest
    # A CSV with rows but without its record is not continued.
    predictions_record(preds).unlink()
    error_line(infer(world, preds, world.scan_root, "-m", world.run_b, "--resume"), str(preds), "no record")


# 3. An ensemble counts each model once ---------------------------------------------------


def test_a_model_given_twice_counts_once(world, tmp_path):
    """run_b given as itself, as its parent folder, spelled with './' and as its export: the mean is
    that of run_a and run_b (as if each were given once), and each repeat is named in a notice."""
    single = {}
    for name, run in (("a", world.run_a), ("b", world.run_b)):
        assert infer(world, tmp_path / f"{name}.csv", world.scan_root, "-m", run, "--no-tta").exit_code == 0
        single[name] = probabilities(tmp_path / f"{name}.csv")
    export = export_model(world.run_b, tmp_path / "b.safetensors")
    dotted = f"{world.run_b.parent}/./{world.run_b.name}/"
    result = infer(world, tmp_path / "both.csv", world.scan_root, "--no-tta", "-m", world.run_a, "-m", world.run_b,
                   "-m", world.run_b.parent, "-m", dotted, "-m", export)
    assert result.exit_code == 0, result.output
    assert result.output.count("counted once") == 3
    assert f"{export} is the same model as {world.run_b}" in result.output
    both = probabilities(tmp_path / "both.csv")
    for name, probability in both.items():
        assert probability == pytest.approx((single["a"][name] + single["b"][name]) / 2, abs=2e-6)
    # The digest ignores where a model lies and what an export leaves out, but not its weights.
    assert load_source(export).digest == load_source(world.run_b).digest != load_source(world.run_a).digest
    # A model for both tasks is not added again as a presence model.
    ensemble = Ensemble([load_source(world.run_a)], torch.device("cpu"), None,
                        presence_sources=[load_source(world.run_a), load_source(world.run_b)])
    assert [member.source.path for member in ensemble.members] == [world.run_a, world.run_b]


# 9. A full disk leaves nothing that blocks the retry -------------------------------------


@contextlib.contextmanager
def small_mount(folder: Path, options: str):
    """A tmpfs mounted on ``folder`` (skips the test where mounting is not allowed)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or mounted.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_leaves_no_csv_and_the_same_command_then_works(world, tmp_path, monkeypatch):
    """ENOSPC when the new CSV reaches the disk (at its fsync, where delayed allocation reports it):
    the message names the CSV and --resume, no file is left, and the same command works once there
    is space, with or without --resume."""
    preds = tmp_path / "preds.csv"

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    error_line(infer(world, preds, world.scans[0], "-m", world.run_a), f"Cannot write {preds}", "No space left", "--resume")
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert infer(world, preds, world.scans[0], "-m", world.run_a, "--resume").exit_code == 0
    assert infer(world, preds, world.scans[0], "-m", world.run_a).exit_code == 0
    assert len(probabilities(preds)) == 1


def test_a_really_full_disk_leaves_nothing_that_blocks_the_retry(world, tmp_path):
    """The issue's case on a real file system with no free space (a 256 KiB tmpfs filled up)."""
    with small_mount(tmp_path / "disk", "size=256k") as disk:
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb", buffering=0) as handle:
            while True:
                handle.write(b"\0" * 4096)
        preds = disk / "preds.csv"
        error_line(infer(world, preds, world.scan_root, "-m", world.run_a), f"Cannot write {preds}", "No space left",
                   "--resume")
        assert sorted(path.name for path in disk.iterdir()) == ["filler"]
        filler.unlink()
        retried = infer(world, preds, world.scan_root, "-m", world.run_a)
        assert retried.exit_code == 0, retried.output
        assert len(probabilities(preds)) == len(world.scans)


# Not tried in the issue: read-only output folders, pruning while writing ------------------


def test_read_only_output_folders_give_one_line_naming_the_output(world, tmp_path):
    """A read-only file system (root ignores a folder's mode bits, so chmod alone cannot test this as
    root): every writing command fails in one line naming its output, and nothing is half-written."""
    with small_mount(tmp_path / "ro", "ro,size=64k") as folder:
        for output, command in (
            (folder / "preds.csv", ("infer", world.scans[0], "-m", world.run_a, "-o", folder / "preds.csv",
                                    "--cache-dir", world.cache, *FAST)),
            (folder / "stats", ("stats", world.scan_root, "-o", folder / "stats")),
            (folder / "model.safetensors", ("export", world.run_a, folder / "model.safetensors")),
            (folder / "run", ("train", "--directory", tmp_path / "no-data", "-o", folder / "run")),
        ):
            error_line(invoke(*command), f"Cannot write {output}", "Read-only file system")
        assert list(folder.iterdir()) == []


def test_prune_cache_beside_a_writer_and_another_prune(world, tmp_path, monkeypatch):
    """A size folder that prune-cache removes as empty just after a writer made it is made again; a
    file that a second prune-cache removed first is passed over without an error."""
    cache_dir = tmp_path / "cache"
    cache = VolumeCache(cache_dir, VolumeShape(*SIZE))
    folder = cache_dir / cache.shape.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    prune_cache(cache_dir)
    assert not folder.exists()
    assert cache.get(world.scans[0]).shape == (1, *SIZE)  # the writer goes on
    entry = next(folder.iterdir())
    leftover = folder / f".{entry.name}.abcd1234.tmp"  # a killed writer's temporary file, two hours old
    shutil.copy(entry, leftover)
    os.utime(leftover, (0, 0))
    unlink = Path.unlink

    def removed_by_another_prune(path, missing_ok=False):
        unlink(path)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))

    monkeypatch.setattr(Path, "unlink", removed_by_another_prune)
    summary = prune_cache(cache_dir)
    assert summary.removed == [] and summary.kept == 1 and not leftover.exists()
