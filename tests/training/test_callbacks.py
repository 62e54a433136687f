"""The training callbacks on a tiny fastai Learner: the 1cycle schedule from the run's settings,
metrics.csv with absolute epochs, the guard against non-finite losses, the step timer's measurement
and estimate, and config.json records."""

import json
import math
import time

import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch.utils.data import TensorDataset

from cov3d.errors import Cov3dError, NonFiniteTraining
from cov3d.runfiles import CONFIG_FILE, METRICS_FILE
from cov3d.settings import TrainSettings
from cov3d.training.callbacks import (
    FORWARD_SHARE,
    TIMED_STEPS,
    FiniteGuard,
    MetricsLog,
    OneCycleSchedule,
    StepTimer,
    record_in_config,
    speed_line,
)

STEP_SECONDS = 0.05


class SlowSteps(torch.nn.Module):
    """A linear layer whose training forward pass sleeps STEP_SECONDS (``first_extra`` more the first
    time), its validation pass ``valid_seconds``; ``sleep`` is ``time.sleep`` unless given."""

    def __init__(self, valid_seconds: float = 0.0, step_seconds: float = STEP_SECONDS, first_extra: float = 0.0,
                 sleep=time.sleep):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.valid_seconds, self.step_seconds, self.extra, self.sleep = valid_seconds, step_seconds, first_extra, sleep

    def forward(self, x):
        if self.training:
            self.sleep(self.step_seconds + self.extra)
            self.extra = 0.0
        else:
            self.sleep(self.valid_seconds)
        return self.linear(x)


class FakeClock:
    """``perf_counter`` and ``sleep`` on a clock that only sleeping moves."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def toy_learner(train_batches: int, valid_batches: int, callbacks: list, model: torch.nn.Module | None = None,
                opt_func=SGD) -> Learner:
    """A Learner of a linear layer on zeros: batches of 2 rows of 3 features."""
    data = TensorDataset(torch.zeros(train_batches * 2, 3), torch.zeros(train_batches * 2, 1))
    valid = TensorDataset(torch.zeros(valid_batches * 2, 3), torch.zeros(valid_batches * 2, 1))
    dls = DataLoaders.from_dsets(data, valid, bs=2, shuffle=False, drop_last=False, device="cpu")
    return Learner(dls, model or torch.nn.Linear(3, 1), loss_func=torch.nn.functional.mse_loss, opt_func=opt_func,
                   cbs=callbacks)


def fit_with_timer(train_batches: int, valid_batches: int, epochs: int, evaluation_passes: int = 0,
                   model: SlowSteps | None = None) -> list[dict]:
    measured = []
    timer = StepTimer(measured.append, "16x32x32", "CPU test", "fp32", evaluation_passes)
    learner = toy_learner(train_batches, valid_batches, [timer], model or SlowSteps())
    with learner.no_bar(), learner.no_logging():
        learner.fit(epochs, lr=1e-3)
    return measured


@pytest.mark.parametrize(("train_batches", "evaluation_passes"), [(1, 0), (2, 0), (TIMED_STEPS + 4, 0), (2, 6)])
def test_the_step_timer_measures_a_step_and_estimates_the_fit(train_batches, evaluation_passes):
    """The first announcement early in the first epoch: seconds a step near the sleep of each step; the
    estimate counts every training step, each validation batch at a third of a step, and the evaluation
    passes over the validation batches after the fit at the same third."""
    measured = fit_with_timer(train_batches, valid_batches=3, epochs=2, evaluation_passes=evaluation_passes)
    assert len(measured) == 2
    speed = measured[0]
    assert STEP_SECONDS <= speed["seconds_per_step"] < 5.0  # a sleep sets the floor; a loaded machine adds to it
    assert (speed["steps_per_epoch"], speed["epochs"], speed["shape"]) == (train_batches, 2, "16x32x32")
    step = speed["seconds_per_step"]
    expected = (2 * (train_batches * step + 3 * step * FORWARD_SHARE) + evaluation_passes * 3 * step * FORWARD_SHARE) / 60
    assert speed["estimated_minutes"] == pytest.approx(expected, abs=0.051)
    assert speed_line(speed).startswith(f"Speed on CPU test: fp32, about {step:.2f} s a training step: 2 epochs of")
    assert ": 1 epoch of " in speed_line({**speed, "epochs": 1})  # a resumed run's last epoch


@pytest.mark.parametrize("train_batches", [3, TIMED_STEPS + 4])
def test_after_the_first_epoch_the_step_timer_announces_what_is_left_from_that_epochs_time(monkeypatch, train_batches):
    """On a fake clock: 4 epochs of training steps of 6 s (the first 30 s longer) and 2 validation batches
    of 12 s, 5 evaluation passes. The first step is left out of the measured 6 s a step; the first
    estimate is 4 epochs of the steps and 2 validation batches at a third of a step, and 5 passes of
    those; the second keeps the first's fields and adds the first epoch's time with its first step at
    6 s, and 3 such epochs and 5 passes of the 24 s its validation took."""
    clock = FakeClock()
    monkeypatch.setattr("cov3d.training.callbacks.time", clock)
    model = SlowSteps(valid_seconds=12.0, step_seconds=6.0, first_extra=30.0, sleep=clock.sleep)
    measured = fit_with_timer(train_batches, valid_batches=2, epochs=4, evaluation_passes=5, model=model)
    assert len(measured) == 2
    first, second = measured
    assert first["seconds_per_step"] == 6.0
    assert first["estimated_minutes"] == round((4 * (train_batches * 6 + 2 * 2) + 5 * 2 * 2) / 60, 1)
    assert second.items() >= first.items()
    epoch = train_batches * 6 + 24
    assert second["first_epoch_seconds"] == epoch
    assert second["minutes_left"] == round((3 * epoch + 5 * 24) / 60, 1)
    assert speed_line(second) == (f"The first epoch took {epoch} s: the 3 left and the final evaluation take "
                                  f"about {second['minutes_left']:.1f} min.")


def test_a_one_epoch_fit_is_announced_once():
    assert len(fit_with_timer(2, valid_batches=1, epochs=1)) == 1


class HyperLog(Callback):
    """The lr and momentum of every training batch, after the schedule set them."""

    order = 61  # after OneCycleSchedule

    def __init__(self):
        self.seen = []

    def before_batch(self):
        if self.training:
            self.seen.append((self.opt.hypers[-1]["lr"], self.opt.hypers[-1]["mom"]))


def test_one_cycle_follows_the_runs_settings():
    settings = TrainSettings(learning_rate=1e-2, epochs=2, pct_start=0.5, div_factor=10.0, final_div_factor=100.0,
                             momentums=(0.9, 0.5, 0.8))
    log = HyperLog()
    learner = toy_learner(4, 1, [OneCycleSchedule(settings), log])
    with learner.no_bar(), learner.no_logging():
        learner.fit(settings.epochs, lr=settings.learning_rate)
    (first_lr, first_mom), peak = log.seen[0], log.seen[4]  # batch 4 of 8: the peak at pct_start = 0.5
    assert first_lr == pytest.approx(1e-3) and first_mom == pytest.approx(0.9)
    assert peak == pytest.approx((1e-2, 0.5))
    schedule = OneCycleSchedule(settings)
    assert schedule.schedules["lr"](1.0) == pytest.approx(1e-4)
    assert schedule.schedules["mom"](1.0) == pytest.approx(0.8)


def test_one_cycle_settings_are_checked():
    with pytest.raises(Cov3dError, match="momentums"):
        TrainSettings(momentums=(0.9, 0.8))
    with pytest.raises(Cov3dError, match="momentums"):
        TrainSettings(momentums=(0.9, 1.0, 0.9))
    with pytest.raises(Cov3dError, match="div_factor"):
        TrainSettings(div_factor=0.0)
    assert TrainSettings(momentums=[0.9, 0.8, 0.9]).momentums == (0.9, 0.8, 0.9)  # as read from config.json


def test_metrics_log_numbers_epochs_from_the_first_and_keeps_earlier_rows(tmp_path):
    path = tmp_path / METRICS_FILE
    learner = toy_learner(2, 1, [MetricsLog(path)])
    with learner.no_bar(), learner.no_logging():
        learner.fit(2, lr=1e-3)
    header, *rows = path.read_text().splitlines()
    assert header.split(",")[:3] == ["epoch", "train_loss", "valid_loss"]
    assert [row.split(",")[0] for row in rows] == ["0", "1"]
    resumed = toy_learner(2, 1, [MetricsLog(path, first_epoch=1)])
    with resumed.no_bar(), resumed.no_logging():
        resumed.fit(1, lr=1e-3)
    assert [row.split(",")[0] for row in path.read_text().splitlines()[1:]] == ["0", "1"]
    assert path.read_text().splitlines()[1] == rows[0]  # the epoch before the resumed one is kept as it was


def test_metrics_log_of_another_process_writes_nothing(tmp_path):
    learner = toy_learner(2, 1, [MetricsLog(tmp_path / METRICS_FILE, write=False)])
    with learner.no_bar(), learner.no_logging():
        learner.fit(1, lr=1e-3)
    assert not (tmp_path / METRICS_FILE).exists()


class NaNAfter(torch.nn.Module):
    """A linear layer whose output turns NaN from training batch ``start`` on."""

    def __init__(self, start: int):
        super().__init__()
        self.linear, self.start, self.calls = torch.nn.Linear(3, 1), start, 0

    def forward(self, x):
        self.calls += self.training
        out = self.linear(x)
        return out * math.nan if self.training and self.calls > self.start else out


def test_finite_guard_stops_at_the_first_non_finite_loss(tmp_path):
    guard = FiniteGuard(run_dir=tmp_path, epochs=3, first_epoch=1, precision="fp32", learning_rate=1e-3)
    model = NaNAfter(start=3)
    learner = toy_learner(2, 1, [guard], model)
    before = model.linear.bias.detach().clone()
    with learner.no_bar(), learner.no_logging(), pytest.raises(NonFiniteTraining) as raised:
        learner.fit(2, lr=1e-3)
    error = raised.value
    assert (error.what, error.epoch, error.batch, error.batches, error.epochs) == ("training loss", 3, 2, 2, 3)
    assert error.resumable_epoch is None  # no checkpoint in the run folder
    assert not torch.equal(model.linear.bias, before)  # the finite steps before it were applied (inputs are zeros)
    assert torch.isfinite(model.linear.bias).all()  # the non-finite one was not


def test_record_in_config_adds_one_key(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"epochs": 2}))
    record_in_config(tmp_path, "speed", {"seconds_per_step": 0.5})
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == {"epochs": 2, "speed": {"seconds_per_step": 0.5}}
