"""Resume and reproducibility: a SIGKILLed run continued with --resume ends exactly like an uninterrupted one."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cov3d.errors import Cov3dError
from cov3d.synthetic.generator import generate_dataset
from cov3d.training.callbacks import OneCycleSchedule
from cov3d.training.checkpoint import RESUME_FILE, load_resume_state, rng_states, save_resume_state, set_rng_states

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from cov3d.cli import app; app()"]
EPOCHS = 2
KILL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def small_dataset(module_dir) -> Path:
    """8 labelled scans (6 train, 2 validation) of 32x32 slices: 2 batches of 3 per epoch."""
    out = module_dir / "small-dataset"
    generate_dataset(out, scans=8, test_scans=0, seed=1, slice_size=32, depth_scale=0.05)
    return out


def cli_env() -> dict[str, str]:
    """Import this checkout's cov3d; one thread per run so that two runs share the CPUs evenly."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def train_command(data: Path, run: Path, cache: Path) -> list[str]:
    return CLI + [
        "train", "--directory", str(data), "--output-dir", str(run), "--cache-dir", str(cache),
        "--depth", "8", "--width", "32", "--epochs", str(EPOCHS), "--batch-size", "3", "--penultimate", "8",
        "--no-pretrained", "--device", "cpu", "--precision", "fp32", "--workers", "1", "--seed", "3",
    ]


def metric_rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the wall-clock column."""
    with (run / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def runs(module_dir, small_dataset) -> tuple[Path, Path]:
    """The same seeded run twice, side by side (one thread each): one uninterrupted, one SIGKILLed as
    soon as epoch 0's checkpoint is on disk. Returns (uninterrupted, killed) run folders."""
    root = module_dir / "runs"
    full = subprocess.Popen(train_command(small_dataset, root / "full", root / "cache-full"), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = root / "killed"
    victim = subprocess.Popen(train_command(small_dataset, killed, root / "cache-killed"), env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not (killed / RESUME_FILE).exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    _, errors = full.communicate(timeout=KILL_TIMEOUT_S)
    assert full.returncode == 0, errors[-2000:]
    return root / "full", killed


@pytest.fixture(scope="module")
def uninterrupted(runs) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def killed(runs) -> Path:
    return runs[1]


def test_killed_run_left_one_epoch(killed):
    assert load_resume_state(killed)["epoch"] == 0
    assert not (killed / "summary.json").exists()
    assert not [path.name for path in killed.iterdir() if path.name.endswith(".tmp")]  # no temporary file left


def test_seeded_runs_match_exactly(uninterrupted, killed):
    """Two processes with the same seed produce bit-identical losses and scores for epoch 0."""
    assert metric_rows(killed)[0] == metric_rows(uninterrupted)[0]
    config = json.loads((killed / "config.json").read_text())
    assert config["dataset_fingerprint"] == json.loads((uninterrupted / "config.json").read_text())["dataset_fingerprint"]
    assert {"torch", "torchvision", "fastai", "python", "cov3d"} <= set(config["versions"])
    assert config["arguments"]["device"] == "cpu" and config["seed"] == 3


def test_resume_ends_like_an_uninterrupted_run(uninterrupted, killed, small_dataset):
    """Resumed with no option but --resume: precision (fp32 even where 'auto' means bf16), device, cache
    folder and workers come from config.json, and the weights end bit for bit as uninterrupted."""
    result = subprocess.run(
        CLI + ["train", "--resume", str(killed)], env=cli_env(), capture_output=True, text=True, timeout=KILL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "overriding" not in result.stdout
    assert len(metric_rows(killed)) == EPOCHS
    assert metric_rows(killed) == metric_rows(uninterrupted)
    assert json.loads((killed / "summary.json").read_text()) == json.loads((uninterrupted / "summary.json").read_text())
    assert load_resume_state(killed)["epoch"] == EPOCHS - 1


def test_resume_refuses_a_finished_run(uninterrupted, tmp_path):
    from cov3d.training.train import resume_training

    with pytest.raises(Cov3dError, match="nothing to resume"):
        resume_training(uninterrupted, cache_dir=tmp_path, device="cpu", precision="fp32", workers=1)
    assert not tmp_path.joinpath("8x32x32").exists()  # refused before reading any scan


def test_resume_reports_each_override_and_refuses_new_settings(uninterrupted, tmp_path):
    from typer.testing import CliRunner

    from cov3d.cli import app

    result = CliRunner().invoke(app, ["train", "--resume", str(uninterrupted), "--precision", "bf16", "--workers", "1",
                                      "--cache-dir", str(tmp_path / "other-cache")])
    assert result.exit_code == 1 and "nothing to resume" in result.output and "Traceback" not in result.output
    assert "overriding precision: recorded fp32, now bf16" in result.output
    assert f"overriding cache-dir: recorded {uninterrupted.parent / 'cache-full'}, now {tmp_path / 'other-cache'}" in result.output
    assert "workers" not in result.output  # given again unchanged: not an override
    refused = CliRunner().invoke(app, ["train", "--resume", str(uninterrupted), "--epochs", "5"])
    assert refused.exit_code == 1 and "--epochs cannot change when resuming" in refused.output


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(Cov3dError, match="checkpoint.pth not found"):
        load_resume_state(tmp_path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_resume_state(tmp_path / "state.pth", {"format": 1, "rng": rng_states()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_states(torch.load(tmp_path / "state.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_one_cycle_schedule_matches_fastai_formula():
    """lr at the start, at the peak (25 % of the run) and at the end: 1e-4/25, 1e-4, 1e-4/1e5 (fastai defaults)."""
    schedule = OneCycleSchedule(lr_max=1e-4, epochs=4, first_epoch=1)
    lr = schedule.schedules["lr"]
    assert lr(0.0) == pytest.approx(4e-6) and lr(0.25) == pytest.approx(1e-4) and lr(1.0) == pytest.approx(1e-9)
    schedule.epoch, schedule.iter, schedule.n_iter = 0, 5, 10  # absolute epoch 1, batch 5 of 10
    assert schedule.position() == pytest.approx(15 / 40)
