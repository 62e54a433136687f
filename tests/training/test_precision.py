"""The precision callbacks on a tiny Conv3d Learner: plain (channels-last) batches, bf16 autocast of
the forward pass with an fp32 loss and checked convolutions on a CPU, and which callbacks each
precision gets."""

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch import nn
from torch.utils.data import TensorDataset

from cov3d.training.precision import CpuAutocast, CudaAutocast, PlainBatches, precision_callbacks

VOLUME = (2, 2, 4, 4)  # (C, D, H, W) of each toy input: two channels, so that the memory format shows


class TinyConv(nn.Module):
    """A Conv3d and a linear layer: (B, 2, 2, 4, 4) -> (B, 1)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv3d(2, 2, (1, 3, 3), padding=(0, 1, 1)), nn.Linear(2 * 2 * 4 * 4, 1)
        self.conv_dtypes = []

    def forward(self, x):
        features = self.conv(x)
        self.conv_dtypes.append(features.dtype)
        return self.head(features.flatten(1))


class Seen(Callback):
    """What the model is given and what the loss sees, per training batch."""

    order = 20  # after PlainBatches and CpuAutocast have acted on the batch

    def __init__(self):
        self.inputs, self.preds = [], []

    def before_batch(self):
        volume = self.xb[0]
        self.inputs.append((type(volume), volume.is_contiguous(memory_format=torch.channels_last_3d)))

    def after_loss(self):
        self.preds.append(self.pred.dtype)


def fit(callbacks: list[Callback]) -> tuple[TinyConv, Seen]:
    data = TensorDataset(torch.rand(4, *VOLUME), torch.rand(4, 1))
    dls = DataLoaders.from_dsets(data, data, bs=2, shuffle=False, device="cpu")
    model, seen = TinyConv(), Seen()
    learner = Learner(dls, model, loss_func=nn.functional.mse_loss, opt_func=SGD, cbs=[*callbacks, seen])
    with learner.no_bar(), learner.no_logging():
        learner.fit(1, lr=1e-3)
    return model, seen


def test_which_callbacks_each_precision_gets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [type(cb) for cb in precision_callbacks(cpu, None)] == [PlainBatches]
    assert [type(cb) for cb in precision_callbacks(cpu, torch.bfloat16)] == [PlainBatches, CpuAutocast]
    fp16 = precision_callbacks(cuda, torch.float16)
    assert [type(cb) for cb in fp16] == [PlainBatches, CudaAutocast] and fp16[1].amp_mode.name.lower() == "fp16"
    assert isinstance(fp16[1], MixedPrecision)  # fastai's gradient scaler and skipped-step handling
    assert precision_callbacks(cuda, torch.bfloat16)[1].amp_mode.name.lower() == "bf16"
    assert not precision_callbacks(cpu, None)[0].channels_last and precision_callbacks(cpu, torch.bfloat16)[0].channels_last


@pytest.mark.parametrize("channels_last", [False, True])
def test_plain_batches_give_plain_tensors(channels_last):
    model, seen = fit([PlainBatches(channels_last)])
    assert {kind for kind, _ in seen.inputs} == {torch.Tensor}
    assert {last for _, last in seen.inputs} == {channels_last}
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last_3d) == channels_last


def test_cpu_autocast_runs_the_forward_pass_in_bf16_and_the_loss_in_fp32():
    model, seen = fit([PlainBatches(True), CpuAutocast(torch.bfloat16)])
    assert set(model.conv_dtypes) == {torch.bfloat16}  # training and validation passes alike
    assert set(seen.preds) == {torch.float32}
    assert "forward" not in vars(model.conv)  # the checked convolutions are undone after the fit


class FailingConv(TinyConv):
    """Raises (as an out-of-memory error would) in the forward pass of the `fail_at`-th call."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("out of memory")
        return super().forward(x)


class RaiseAfterLoss(Callback):
    """Raises in after_loss before the precision callbacks act, as FiniteGuard (order 1) does on a NaN loss."""

    order = 1

    def after_loss(self):
        raise RuntimeError("non-finite loss")


def failed_fit(model: TinyConv, callbacks: list[Callback]) -> None:
    data = TensorDataset(torch.rand(4, *VOLUME), torch.rand(4, 1))
    dls = DataLoaders.from_dsets(data, data, bs=2, shuffle=False, device="cpu")
    learner = Learner(dls, model, loss_func=nn.functional.mse_loss, opt_func=SGD, cbs=callbacks)
    with learner.no_bar(), learner.no_logging(), pytest.raises(RuntimeError, match="out of memory|non-finite"):
        learner.fit(1, lr=1e-3)


def fp32_matmul() -> bool:
    return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision", [
    lambda: CpuAutocast(torch.bfloat16),
    lambda: CudaAutocast(torch.device("cpu"), torch.bfloat16),  # the CUDA callback with CPU autocast: same structure
], ids=["cpu", "cuda-structure"])
@pytest.mark.parametrize("failure", ["forward", "after_loss"])
def test_autocast_never_stays_on_after_a_failed_fit(precision, failure):
    model = FailingConv(fail_at=2 if failure == "forward" else 0)
    failed_fit(model, [PlainBatches(True), precision(), *([RaiseAfterLoss()] if failure == "after_loss" else [])])
    assert fp32_matmul()
    assert "forward" not in vars(model.conv)  # nor the checked convolutions
    if failure == "after_loss":
        assert model.conv_dtypes == [torch.bfloat16]  # the forward pass ran under autocast


def test_the_cuda_callback_autocasts_the_forward_pass_only():
    model, seen = fit([PlainBatches(True), CudaAutocast(torch.device("cpu"), torch.bfloat16)])
    assert set(model.conv_dtypes) == {torch.bfloat16} and set(seen.preds) == {torch.float32}
    assert "forward" not in vars(model) and fp32_matmul()
