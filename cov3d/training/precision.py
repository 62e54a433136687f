"""Callbacks for the training loop's precision: plain (optionally channels-last) batches, then
fastai's AMP on CUDA or bf16 autocast with checked convolution gradients on a CPU (the dtype comes
from ``cov3d.runtime.choose_precision``)."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision

from cov3d.runtime import autocast, use_channels_last
from cov3d.training.bf16_convs import checked_bf16_convs


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


class CpuAutocast(Callback):
    """bf16 autocast of the forward pass on CPUs, with checked convolution weight gradients
    (``checked_bf16_convs``) for the whole fit; the loss is computed in fp32."""

    order = 10

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def before_fit(self) -> None:
        self.checked_convs = checked_bf16_convs(self.learn.model)
        self.checked_convs.__enter__()

    def after_fit(self) -> None:
        self.checked_convs.__exit__(None, None, None)

    def before_batch(self) -> None:
        self.context = autocast(torch.device("cpu"), self.dtype)
        self.context.__enter__()

    def after_pred(self) -> None:
        self.context.__exit__(None, None, None)
        self.learn.pred = self.pred.float()


def precision_callbacks(device: torch.device, dtype: torch.dtype | None) -> list[Callback]:
    """Callbacks for the chosen autocast dtype: fastai's AMP on CUDA, bf16 autocast on CPU."""
    callbacks: list[Callback] = [PlainBatches(use_channels_last(dtype))]
    if dtype is None:
        return callbacks
    if device.type == "cuda":
        return callbacks + [MixedPrecision(amp_mode="bf16" if dtype == torch.bfloat16 else "fp16")]
    return callbacks + [CpuAutocast(dtype)]
