"""The training callbacks on a tiny fastai Learner: the step timer's measurement and estimate."""

import time

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch.utils.data import TensorDataset

from cov3d.training.callbacks import FORWARD_SHARE, TIMED_STEPS, StepTimer, speed_line

STEP_SECONDS = 0.05


class SlowSteps(torch.nn.Module):
    """A linear layer whose training forward pass sleeps STEP_SECONDS (validation passes do not)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x):
        if self.training:
            time.sleep(STEP_SECONDS)
        return self.linear(x)


def fit_with_timer(train_batches: int, valid_batches: int, epochs: int) -> list[dict]:
    data = TensorDataset(torch.zeros(train_batches * 2, 3), torch.zeros(train_batches * 2, 1))
    valid = TensorDataset(torch.zeros(valid_batches * 2, 3), torch.zeros(valid_batches * 2, 1))
    dls = DataLoaders.from_dsets(data, valid, bs=2, shuffle=False, drop_last=False, device="cpu")
    measured = []
    learner = Learner(dls, SlowSteps(), loss_func=torch.nn.functional.mse_loss, opt_func=SGD,
                      cbs=[StepTimer(measured.append, "16x32x32", "CPU test", "fp32")])
    with learner.no_bar(), learner.no_logging():
        learner.fit(epochs, lr=1e-3)
    return measured


@pytest.mark.parametrize("train_batches", [1, 2, TIMED_STEPS + 4])
def test_the_step_timer_measures_a_step_and_estimates_the_fit(train_batches):
    """One announcement per fit, early in the first epoch; seconds a step near the sleep of each step;
    the estimate counts every training step and each validation batch at a third of a step."""
    measured = fit_with_timer(train_batches, valid_batches=3, epochs=2)
    assert len(measured) == 1
    speed = measured[0]
    assert STEP_SECONDS <= speed["seconds_per_step"] < STEP_SECONDS + 0.1
    assert (speed["steps_per_epoch"], speed["epochs"], speed["shape"]) == (train_batches, 2, "16x32x32")
    step = speed["seconds_per_step"]
    expected = 2 * (train_batches * step + 3 * step * FORWARD_SHARE) / 60
    assert speed["estimated_minutes"] == pytest.approx(expected, abs=0.051)
    assert speed_line(speed).startswith(f"Speed on CPU test: fp32, about {step:.2f} s a training step: 2 epochs of")
