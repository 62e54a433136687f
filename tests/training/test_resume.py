"""Resume and reproducibility: a SIGKILLed run continued with --resume ends exactly like an uninterrupted one."""

import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import Adam
from torch import nn

from cov3d.errors import Cov3dError
from cov3d.model.files import TEMPERATURES_KEY
from cov3d.runfiles import (
    CONFUSION_STEMS,
    RELIABILITY_FILE,
    RESUME_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILES,
    leftover_run_temporaries,
)
from cov3d.settings import TrainSettings
from cov3d.synthetic.generator import generate_dataset
from cov3d.training.callbacks import OneCycleSchedule
from cov3d.training.checkpoint import (
    TrainingState,
    load_optimizer_state,
    load_resume_state,
    misplaced_optimizer_state,
    rng_states,
    save_resume_state,
    set_rng_states,
)

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
    # Only a file being written at the moment of the kill may have been left half-written, as a temporary file.
    temporaries = [path for path in killed.iterdir() if path.name.endswith(".tmp")]
    assert temporaries == leftover_run_temporaries(killed) and len(temporaries) <= 1


def test_seeded_runs_match_exactly(uninterrupted, killed):
    """Two processes with the same seed produce bit-identical losses and scores for epoch 0."""
    assert metric_rows(killed)[0] == metric_rows(uninterrupted)[0]
    config = json.loads((killed / "config.json").read_text())
    assert config["dataset_fingerprint"] == json.loads((uninterrupted / "config.json").read_text())["dataset_fingerprint"]
    assert {"torch", "torchvision", "fastai", "python", "cov3d"} <= set(config["versions"])
    assert config["arguments"]["device"] == "cpu" and config["seed"] == 3


def test_resume_ends_like_an_uninterrupted_run(uninterrupted, killed, tmp_path):
    """Resumed with no option but --resume: precision (fp32 even where 'auto' means bf16), device, cache
    folder and workers come from config.json, and the weights end bit for bit as uninterrupted. A temporary
    file that a kill left in the run folder is removed, and said so; another program's is left alone.
    (A copy is resumed: the killed run stays as it was for the other tests, in whatever order they run.)"""
    killed = shutil.copytree(killed, tmp_path / "killed")
    (killed / ".metrics.csv.zz99_z9z.tmp").write_text("epoch,train_loss\n0,")
    (killed / ".notes.txt.zz99_z9z.tmp").write_text("not cov3d's")
    result = subprocess.run(
        CLI + ["train", "--resume", str(killed)], env=cli_env(), capture_output=True, text=True, timeout=KILL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "temporary file(s) that a killed run left" in result.stderr and ".metrics.csv.zz99_z9z.tmp" in result.stderr
    assert leftover_run_temporaries(killed) == [] and (killed / ".notes.txt.zz99_z9z.tmp").is_file()
    assert "overriding" not in result.stdout
    assert len(metric_rows(killed)) == EPOCHS
    assert metric_rows(killed) == metric_rows(uninterrupted)
    assert json.loads((killed / "summary.json").read_text()) == json.loads((uninterrupted / "summary.json").read_text())
    assert load_resume_state(killed)["epoch"] == EPOCHS - 1


def test_resume_after_the_last_epoch_runs_only_the_evaluation(uninterrupted, tmp_path):
    """A run stopped after its last checkpoint, in the evaluation after training (no summary.json, no
    calibration yet), is finished by --resume without another epoch: the same summary, temperatures and
    figures as the run that was not stopped, the weights and metrics untouched."""
    stopped = tmp_path / "stopped"
    shutil.copytree(uninterrupted, stopped)
    for name in (SUMMARY_FILE, RELIABILITY_FILE, *(f"{stem}.csv" for stem in CONFUSION_STEMS.values())):
        (stopped / name).unlink()
    config = json.loads((stopped / "config.json").read_text())
    temperatures = config.pop(TEMPERATURES_KEY)
    (stopped / "config.json").write_text(json.dumps(config))
    kept = {path.name: path.read_bytes() for path in stopped.iterdir() if path.suffix in (".safetensors", ".pth", ".csv")}
    result = subprocess.run(
        CLI + ["train", "--resume", str(stopped)], env=cli_env(), capture_output=True, text=True, timeout=KILL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopped before the evaluation after training" in result.stderr + result.stdout
    assert json.loads((stopped / SUMMARY_FILE).read_text()) == json.loads((uninterrupted / SUMMARY_FILE).read_text())
    assert json.loads((stopped / "config.json").read_text())[TEMPERATURES_KEY] == temperatures
    assert (stopped / RELIABILITY_FILE).is_file()
    for stem in CONFUSION_STEMS.values():
        assert (stopped / f"{stem}.csv").read_text() == (uninterrupted / f"{stem}.csv").read_text()
    assert {name: (stopped / name).read_bytes() for name in kept} == kept
    again = subprocess.run(CLI + ["train", "--resume", str(stopped)], env=cli_env(), capture_output=True, text=True)
    assert again.returncode == 1 and "nothing to resume" in again.stdout + again.stderr


def test_a_trained_run_that_lost_kept_weights_is_not_evaluated(uninterrupted, tmp_path):
    from cov3d.training.train import resume_training

    stopped = tmp_path / "stopped"
    shutil.copytree(uninterrupted, stopped, ignore=shutil.ignore_patterns(SUMMARY_FILE, WEIGHTS_FILES["severity"]))
    with pytest.raises(Cov3dError, match=f"{WEIGHTS_FILES['severity']} is missing, so the run's evaluation after training"):
        resume_training(stopped, cache_dir=tmp_path, device="cpu", precision="fp32", workers=1)
    assert not tmp_path.joinpath("8x32x32").exists()  # refused before reading any scan


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
    schedule = OneCycleSchedule(TrainSettings(learning_rate=1e-4, epochs=4), first_epoch=1)
    lr = schedule.schedules["lr"]
    assert lr(0.0) == pytest.approx(4e-6) and lr(0.25) == pytest.approx(1e-4) and lr(1.0) == pytest.approx(1e-9)
    schedule.epoch, schedule.iter, schedule.n_iter = 0, 5, 10  # absolute epoch 1, batch 5 of 10
    assert schedule.position() == pytest.approx(15 / 40)


class _Best:
    """What TrainingState reads from BestCheckpoints."""

    best: dict = {}
    best_epoch: dict = {}


class _MoveModel(Callback):
    """Stands in for fastai moving the model to the GPU at the start of fit (in place, after the optimiser
    exists): here the parameters become float64, a change the optimiser state must follow too."""

    order = -5  # right after TrainEvalCallback (-10), which is where fastai moves the model

    def before_fit(self) -> None:
        self.learn.model.double()


class _Linear(nn.Linear):
    """Takes its input in its own dtype, whatever the model was converted to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def _tiny_learner(cbs) -> Learner:
    torch.manual_seed(0)
    data = [(torch.randn(3), torch.randn(1)) for _ in range(8)]
    dls = DataLoaders.from_dsets(data[:6], data[6:], bs=3, device=torch.device("cpu"))
    return Learner(dls, _Linear(3, 1), loss_func=lambda pred, target: ((pred.float() - target) ** 2).mean(),
                   opt_func=Adam, cbs=cbs)


@pytest.mark.slow
def test_resumed_optimizer_state_follows_the_model_to_its_device(tmp_path):
    """After --resume every Adam state tensor is placed like its parameter, although the model is only moved
    (in place) once fit has started; state loaded before fit, as train() once did, is left behind."""
    first = _tiny_learner([TrainingState(tmp_path / RESUME_FILE, _Best(), 0, None, write=True)])
    first.fit(1, lr=1e-2)
    saved = load_resume_state(tmp_path)
    assert all(value.dtype == torch.float32 for s in saved["optimizer"]["state"] for value in s.values()
               if isinstance(value, torch.Tensor) and value.is_floating_point())

    early = _tiny_learner([_MoveModel()])
    early.create_opt()
    load_optimizer_state(early.opt, saved["optimizer"])  # the old order: state placed like the CPU float32 model
    early.fit(1, lr=1e-2)
    assert misplaced_optimizer_state(early.opt)  # left behind; on a GPU: "Expected all tensors to be on the same device"

    resumed = _tiny_learner([_MoveModel(), TrainingState(tmp_path / "again.pth", _Best(), 1, saved, write=False)])
    resumed.fit(1, lr=1e-2)
    assert next(resumed.model.parameters()).dtype == torch.float64
    assert misplaced_optimizer_state(resumed.opt) == []
    assert len(resumed.opt.state) == 2 and all(s["step"] > saved["optimizer"]["state"][0]["step"]
                                               for s in resumed.opt.state.values())


def test_optimizer_state_is_placed_on_each_parameters_device():
    """State saved on the CPU goes to the device of each parameter (the meta device stands in for a GPU)."""
    opt = Adam(list(nn.Linear(3, 1, device="meta").parameters()), lr=1e-3)
    cpu_state = {"state": [{"grad_avg": torch.ones(1, 3), "sqr_avg": torch.ones(1, 3), "step": 3},
                           {"grad_avg": torch.ones(1), "sqr_avg": torch.ones(1), "step": 3}],
                 "hypers": [dict(opt.hypers[0])]}
    load_optimizer_state(opt, cpu_state)
    assert misplaced_optimizer_state(opt) == []
    assert {value.device.type for s in opt.state.values() for value in s.values()
            if isinstance(value, torch.Tensor)} == {"meta"}
    with pytest.raises(Cov3dError, match="another model"):
        load_optimizer_state(opt, {"state": cpu_state["state"][:1], "hypers": cpu_state["hypers"]})


class _CpuMixedPrecision(MixedPrecision):
    """fastai's fp16 AMP callback with its GradScaler on the CPU (fastai builds it for CUDA only), and an
    infinite gradient in the first step, so that the scaler skips it and halves its scale."""

    def before_fit(self) -> None:
        self.autocast, self.learn.scaler, self.scales = torch.autocast("cpu", dtype=torch.float16), \
            torch.amp.GradScaler("cpu", init_scale=2.0**10), []

    def after_backward(self) -> None:
        if self.epoch == 0 and self.iter == 0:
            next(self.learn.model.parameters()).grad.fill_(math.inf)


class _ScaleAtStart(Callback):
    order = 95  # after TrainingState (90) restored the run

    def before_fit(self) -> None:
        self.scale = self.learn.scaler.get_scale()


def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path):
    """The loss scale an fp16 run reached (halved by an overflow, then grown) goes into checkpoint.pth and
    comes back on resume, instead of the scaler's initial scale."""
    first = _tiny_learner([_CpuMixedPrecision(), TrainingState(tmp_path / RESUME_FILE, _Best(), 0, None, write=True)])
    first.fit(1, lr=1e-2)
    saved = load_resume_state(tmp_path)
    assert saved["grad_scaler"]["scale"] == 2.0**9  # 2**10 halved once by the injected overflow
    assert saved["grad_scaler"]["_growth_tracker"] == 1  # the second step of the epoch was taken
    probe = _ScaleAtStart()
    resumed = _tiny_learner([_CpuMixedPrecision(), TrainingState(tmp_path / "again.pth", _Best(), 1, saved, write=False),
                             probe])
    resumed.fit(1, lr=1e-2)
    assert probe.scale == 2.0**9 and probe.scale != 2.0**10
