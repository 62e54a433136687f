"""Callbacks for the training loop's precision: plain (optionally channels-last) batches, then
fastai's AMP on CUDA or bf16 autocast with checked convolution gradients on a CPU (the dtype comes
from ``cov3d.runtime.choose_precision``). Autocast covers the forward pass only, inside a ``with``
block: whatever a fit raises, it never stays on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from torch import nn

from cov3d.runtime import autocast, use_channels_last
from cov3d.training.bf16_convs import checked_bf16_convs
from cov3d.training.distributed import unwrap


class PlainBatches(Callback):
    """Give the model plain tensors (no fastai subclass overhead), optionally channels-last 3D."""

    order = 5

    def __init__(self, channels_last: bool):
        self.channels_last = channels_last

    def before_fit(self) -> None:
        if self.channels_last:
            self.learn.model.to(memory_format=torch.channels_last_3d)

    def before_batch(self) -> None:
        volume = self.xb[0].as_subclass(torch.Tensor)
        if self.channels_last:
            volume = volume.contiguous(memory_format=torch.channels_last_3d)
        self.learn.xb = (volume,)
        self.learn.yb = tuple(y.as_subclass(torch.Tensor) for y in self.yb)


def forward_within(model: nn.Module, context: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Make every call of `model` run its forward pass inside a fresh ``with context():`` block (until
    ``plain_forward``): an exception in the forward (an out-of-memory error) leaves the context too."""
    forward = type(model).forward.__get__(model)

    def within(*args, **kwargs):
        with context():
            return forward(*args, **kwargs)

    model.forward = within


def plain_forward(model: nn.Module) -> None:
    """Undo ``forward_within``."""
    vars(model).pop("forward", None)


class CpuAutocast(Callback):
    """bf16 autocast of the forward pass on CPUs, with checked convolution weight gradients
    (``checked_bf16_convs``); the loss is computed in fp32. Both are entered in a ``with`` block around
    each forward pass (``forward_within``), so no exception leaves them on."""

    order = 10

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with autocast(torch.device("cpu"), self.dtype), checked_bf16_convs(self.wrapped):
            yield

    def before_fit(self) -> None:
        self.wrapped = unwrap(self.learn.model)
        forward_within(self.wrapped, self.context)

    def after_pred(self) -> None:
        self.learn.pred = self.pred.float()

    def after_fit(self) -> None:
        plain_forward(self.wrapped)


class CudaAutocast(MixedPrecision):
    """fastai's AMP (its gradient scaler under fp16) with autocast of the forward pass only, in a ``with``
    block around each call (``forward_within``) instead of from ``before_batch`` to ``after_loss``, where an
    exception in between (an out-of-memory error, ``FiniteGuard``) left it on for the rest of the process.
    The loss is computed in fp32 from the fp32 prediction."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(amp_mode="bf16" if dtype == torch.bfloat16 else "fp16")
        self.device, self.dtype = device, dtype

    def before_fit(self) -> None:
        super().before_fit()
        self.autocast = None  # fastai's own, entered in before_batch: not used
        self.wrapped = unwrap(self.learn.model)
        forward_within(self.wrapped, lambda: autocast(self.device, self.dtype))

    def before_batch(self) -> None:
        pass

    def after_loss(self) -> None:
        pass

    def after_fit(self) -> None:
        super().after_fit()
        plain_forward(self.wrapped)


def precision_callbacks(device: torch.device, dtype: torch.dtype | None) -> list[Callback]:
    """Callbacks for the chosen autocast dtype: fastai's AMP on CUDA, bf16 autocast on CPU."""
    callbacks: list[Callback] = [PlainBatches(use_channels_last(dtype))]
    if dtype is None:
        return callbacks
    if device.type == "cuda":
        return callbacks + [CudaAutocast(device, dtype)]
    return callbacks + [CpuAutocast(dtype)]
