"""The fused AdamW optimiser against fastai's Adam (the original code's), step for step."""

import copy

import pytest
import torch
from fastai.optimizer import Adam
from fastai.torch_core import norm_bias_params
from torch import nn

from cov3d.errors import Cov3dError
from cov3d.model.files import with_legacy_defaults
from cov3d.settings import FASTAI_ADAM, FUSED_ADAMW, TrainSettings
from cov3d.training.optimizer import fused_adamw, optimizer_function

SCHEDULE = [(1e-3, 0.95), (3e-3, 0.9), (2e-3, 0.85), (5e-4, 0.9), (1e-4, 0.95)]
"""(lr, mom) of five steps, as 1cycle changes them from batch to batch."""
WEIGHT_DECAY = 0.1  # large, so that applying it to the wrong parameters would show


def small_network() -> nn.Module:
    """Conv, ReLU, batch norm, linear: every parameter gets a real gradient (a bias just before batch
    norm would get only rounding noise, which Adam's normalisation magnifies)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm3d(4), nn.Flatten(), nn.Linear(4 * 27, 3))


def run(model: nn.Module, optimizer, generator: torch.Generator) -> None:
    for lr, mom in SCHEDULE:
        optimizer.set_hypers(lr=lr, mom=mom)
        model(torch.randn(2, 1, 3, 3, 3, generator=generator)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_fused_adamw_takes_the_steps_of_fastais_adam():
    """Same parameters after five steps of changing lr and momentum, with decoupled weight decay on the
    weights only (fastai's Learner exempts normalisation and bias parameters: wd_bn_bias=False)."""
    reference_model = small_network()
    model = copy.deepcopy(reference_model)
    reference = Adam(list(reference_model.parameters()), lr=1e-3, wd=WEIGHT_DECAY)
    for p in norm_bias_params(reference_model):
        reference.state[p]["do_wd"] = False  # what Learner.create_opt does
    fused = fused_adamw(list(model.parameters()), lr=1e-3, model=model, weight_decay=WEIGHT_DECAY)
    run(reference_model, reference, torch.Generator().manual_seed(1))
    run(model, fused, torch.Generator().manual_seed(1))
    for (name, expected), actual in zip(reference_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=name)
    decayed = {id(p) for p in fused.opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[4].weight)}
    assert fused.opt.param_groups[1]["weight_decay"] == 0.0


def test_runs_recorded_without_an_optimizer_resume_with_fastais_adam():
    """Old runs continue as they ran: their checkpoints hold fastai's Adam state."""
    config = {key: value for key, value in vars(TrainSettings()).items() if key != "optimizer"}
    assert with_legacy_defaults(config)["optimizer"] == FASTAI_ADAM
    assert TrainSettings().optimizer == FUSED_ADAMW
    assert optimizer_function(FASTAI_ADAM, small_network(), 0.0) is Adam
    with pytest.raises(Cov3dError, match="optimizer"):
        TrainSettings(optimizer="sgd")
