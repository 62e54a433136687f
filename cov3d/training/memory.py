"""GPU memory of a training step, estimated before it runs, and the check that it fits.

The model runs forward on the meta device (shapes only, no memory, under a second) in the run's dtype
while ``saved_tensors_hooks`` count every tensor autograd keeps for the backward pass (each storage once:
an in-place ReLU's output and the next convolution's input are one tensor; parameters and buffers apart).
Twice, at batch 1 and 2: the difference is what one more scan adds. A step then needs

    fixed + batch x (saved + 2 x largest + input)

- fixed: fp32 weights, their gradients, Adam's two averages (16 bytes a parameter) and, under autocast,
  the weights' bf16/fp16 copies (2 bytes); plus the CUDA context (``CUDA_CONTEXT_BYTES``);
- saved: the activations kept for the backward pass, per scan;
- 2 x largest: the backward pass of the largest layer holds its output's and its input's gradients at once;
- input: the batch as uint8 levels and float32 values.

cuDNN workspaces and the caching allocator's rounding come on top; ``scripts/device_check.py`` compares
the estimate with ``torch.cuda.max_memory_reserved`` on a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from cov3d.errors import Cov3dError
from cov3d.model.network import build_model
from cov3d.runtime import PRECISION_NAMES
from cov3d.settings import TrainSettings

GIB = 2**30
CUDA_CONTEXT_BYTES = 600 * 2**20
"""The CUDA context with cuDNN and cuBLAS loaded (typically 0.4-0.8 GiB, by GPU and versions)."""
OPTIMIZER_BYTES_PER_PARAMETER = 4 + 4 + 8
"""fp32 weight, its gradient, Adam's two fp32 averages."""
INPUT_BYTES_PER_VOXEL = 1 + 4
"""A batch on the device: uint8 levels, then float32 values."""
MEMORY_CHECK_ENV = "COV3D_MEMORY_CHECK"
"""Set to 0 to start a run whose estimate exceeds the GPU's free memory (the estimate may be pessimistic)."""


def saved_for_backward(model: nn.Module, volume: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd keeps for the backward pass of ``model(volume)``, each storage once and the model's
    parameters and buffers left out, and the largest such tensor's bytes. Works on meta tensors (no memory used)."""
    sizes: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # alive until counted, so that no storage id is reused meanwhile

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes[storage._cdata] = storage.nbytes()
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(volume)
    state = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    activations = [size for key, size in sizes.items() if key not in state]
    return sum(activations), max(activations, default=0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs (see the module doc): ``fixed`` once, ``per_sample`` for each scan."""

    fixed: int
    saved_per_sample: int
    largest_per_sample: int
    input_per_sample: int

    @property
    def per_sample(self) -> int:
        return self.saved_per_sample + 2 * self.largest_per_sample + self.input_per_sample

    def total(self, batch_size: int, context: bool = True) -> int:
        """Bytes for a step at ``batch_size``, the CUDA context included unless ``context`` is False."""
        return self.fixed + (CUDA_CONTEXT_BYTES if context else 0) + batch_size * self.per_sample

    def largest_batch(self, memory: int, context: bool = True) -> int:
        """The largest batch whose step fits in ``memory`` bytes (0: not even one scan)."""
        return max(0, (memory - self.total(0, context)) // self.per_sample)


def estimate_training_memory(settings: TrainSettings, dtype: torch.dtype | None) -> MemoryEstimate:
    """The memory of a training step with ``settings`` (its shape and head) under autocast ``dtype``
    (None: fp32), counted on the meta device."""
    with torch.device("meta"):
        model = build_model(outputs=settings.outputs, penultimate=settings.penultimate, dropout=settings.dropout,
                            pool=settings.pool, final_bias=settings.final_bias)
    compute = dtype or torch.float32
    model.to(compute).train()
    counts = []
    for batch in (1, 2):
        volume = torch.empty(batch, 1, *settings.shape.dims, device="meta", dtype=compute)
        counts.append(saved_for_backward(model, volume.contiguous(memory_format=torch.channels_last_3d)))
    (saved_1, largest_1), (saved_2, largest_2) = counts
    parameters = sum(p.numel() for p in model.parameters())
    weight_copies = 0 if dtype is None else 2 * parameters
    return MemoryEstimate(
        fixed=OPTIMIZER_BYTES_PER_PARAMETER * parameters + weight_copies,
        saved_per_sample=saved_2 - saved_1,
        largest_per_sample=largest_2 - largest_1,
        input_per_sample=INPUT_BYTES_PER_VOXEL * math.prod(settings.shape.dims),
    )


def check_memory_fits(settings: TrainSettings, dtype: torch.dtype | None, device: torch.device) -> None:
    """Before the first step on a GPU: refuse a batch whose estimated memory exceeds the GPU's free memory
    (``torch.cuda.mem_get_info``, the CUDA context already made), saying which batch or size would fit."""
    if device.type != "cuda" or os.environ.get(MEMORY_CHECK_ENV) == "0":
        return
    free, total = torch.cuda.mem_get_info(device)
    estimate = estimate_training_memory(settings, dtype)
    needed = estimate.total(settings.batch_size, context=False)
    if needed <= free:
        return
    fits = estimate.largest_batch(free, context=False)
    advice = (f"use `batch_size={fits}`" if fits else "even one scan does not fit: use a smaller volume size "
              "(`depth`, `height`, `width`)")
    raise Cov3dError(
        f"A training step at {settings.shape} with `batch_size={settings.batch_size}` in {PRECISION_NAMES[dtype]} "
        f"needs an estimated {needed / GIB:.1f} GiB on {device}, which has {free / GIB:.1f} GiB free of "
        f"{total / GIB:.1f}: {advice}, or another GPU (docs/gpu.md has a table). "
        f"{MEMORY_CHECK_ENV}=0 starts it anyway."
    )
