"""bf16 training on CPUs with 3D convolution weight gradients that are checked against fp32.

oneDNN's bf16 backward-weights kernel for AVX-512 BF16 CPUs without AMX (``jit_bf16:avx512_core_bf16``
in oneDNN 3.x, e.g. AMD Zen 4) returns garbage for 3x3x3 convolutions whose input is two slices deep:
relative errors from 1 to 1e36 that change from call to call (uninitialised accumulators), while the
forward pass and the input gradient stay right. r3d_18's layer4 sees exactly that depth for 16-slice
volumes (16 -> 8 -> 4 -> 2), so Adam's second moment overflows and the weights turn NaN within an
epoch or two. Other CPUs pick other kernels, and other geometries may fail on kernels not tried yet.

So no geometry is trusted blindly: the first time a convolution runs under CPU bf16 autocast with a
given input shape, layout and parameters, its bf16 weight gradient on random data is compared with
the fp32 one (``bf16_weight_grad_is_right``). Where it is right, the convolution runs as usual; where
it is wrong, that convolution's weight gradient is computed in fp32 from the same bf16 tensors
(``Conv3dWithFp32WeightGrad``); its forward pass and input gradient stay in bf16.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

WEIGHT_GRAD_TOLERANCE = 0.05
"""Largest error of a bf16 weight gradient, relative to the fp32 one's largest magnitude. Rounding the
conv's bf16 inputs and output gives about 0.003; the broken kernel gives 1 to 1e36."""
PROBE_CALLS = 2
"""The broken kernel's error changes from call to call; each probe calls it this many times."""
PROBE_SEED = 0
"""Probes draw from their own generator, so checking a kernel leaves the training RNG untouched."""

Geometry = tuple
"""(input shape, channels-last, weight shape, stride, padding, dilation, groups) of one convolution."""

_verdicts: dict[Geometry, bool] = {}


def conv_geometry(volume: torch.Tensor, conv: nn.Conv3d) -> Geometry:
    """The key under which a probe's verdict is kept: everything the kernel choice depends on."""
    channels_last = volume.is_contiguous(memory_format=torch.channels_last_3d) and not volume.is_contiguous()
    return (tuple(volume.shape), channels_last, tuple(conv.weight.shape), conv.stride, conv.padding,
            conv.dilation, conv.groups)


def _weight_grad(volume, weight, out_grad, conv: nn.Conv3d) -> torch.Tensor:
    """d(loss)/d(weight) of conv3d by the same aten call autograd makes, in the tensors' dtype."""
    return torch.ops.aten.convolution_backward(
        out_grad, volume, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0, 0],
        conv.groups, [False, True, False],
    )[1]


def bf16_weight_grad_is_right(geometry: Geometry, conv: nn.Conv3d) -> bool:
    """Whether this CPU's bf16 weight gradient for `geometry` agrees with fp32 on random bf16 data."""
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        return _probe(geometry, conv)


def _probe(geometry: Geometry, conv: nn.Conv3d) -> bool:
    shape, channels_last, weight_shape = geometry[:3]
    generator = torch.Generator().manual_seed(PROBE_SEED)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    volume = torch.randn(shape, generator=generator).to(torch.bfloat16).contiguous(memory_format=memory_format)
    weight = (torch.randn(weight_shape, generator=generator) / math.prod(weight_shape[1:]) ** 0.5).to(torch.bfloat16)
    weight = weight.contiguous(memory_format=memory_format)
    out_shape = F.conv3d(volume[:1], weight, None, conv.stride, conv.padding, conv.dilation, conv.groups).shape
    out_grad = torch.randn((shape[0], *out_shape[1:]), generator=generator).to(torch.bfloat16)
    out_grad = out_grad.contiguous(memory_format=memory_format)
    reference = _weight_grad(volume.float(), weight.float(), out_grad.float(), conv)
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    for _ in range(PROBE_CALLS):
        error = (_weight_grad(volume, weight, out_grad, conv).float() - reference).abs().max() / scale
        if not bool(torch.isfinite(error)) or float(error) > WEIGHT_GRAD_TOLERANCE:
            return False
    return True


class Conv3dWithFp32WeightGrad(torch.autograd.Function):
    """conv3d of bf16 tensors whose backward computes the weight gradient in fp32.

    Forward: volume (B, C, D, H, W) and weight (O, C/g, kD, kH, kW), both bf16 -> (B, O, D', H', W') bf16.
    Backward: the input gradient in bf16 as usual, the weight gradient in fp32 (the master weights' dtype).
    """

    @staticmethod
    def forward(ctx, volume, weight, conv: nn.Conv3d):
        ctx.save_for_backward(volume, weight)
        ctx.conv = conv
        return F.conv3d(volume, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, out_grad):
        volume, weight = ctx.saved_tensors
        conv = ctx.conv
        volume_grad = weight_grad = None
        if ctx.needs_input_grad[0]:
            volume_grad = torch.nn.grad.conv3d_input(
                volume.shape, weight, out_grad, conv.stride, conv.padding, conv.dilation, conv.groups)
        if ctx.needs_input_grad[1]:
            weight_grad = _weight_grad(volume.float(), weight.float(), out_grad.float(), conv)
        return volume_grad, weight_grad, None


def _checked_forward(conv: nn.Conv3d, volume: torch.Tensor) -> torch.Tensor:
    """Conv3d.forward, except under CPU bf16 autocast with gradients on a geometry that failed its probe."""
    if not (torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and conv.weight.requires_grad):
        return conv._conv_forward(volume, conv.weight, conv.bias)
    geometry = conv_geometry(volume, conv)
    if geometry not in _verdicts:
        _verdicts[geometry] = bf16_weight_grad_is_right(geometry, conv)
        if not _verdicts[geometry]:
            logger.info(
                "This CPU's bf16 weight gradient is wrong for a convolution of input %s and weight %s; "
                "that gradient is computed in fp32.", list(geometry[0]), list(geometry[2]))
    if _verdicts[geometry]:
        return conv._conv_forward(volume, conv.weight, conv.bias)
    with torch.autocast("cpu", enabled=False):
        output = Conv3dWithFp32WeightGrad.apply(volume.to(torch.bfloat16), conv.weight.to(torch.bfloat16), conv)
        if conv.bias is not None:
            output = output + conv.bias.to(torch.bfloat16).view(1, -1, 1, 1, 1)
    return output


@contextlib.contextmanager
def checked_bf16_convs(model: nn.Module) -> Iterator[None]:
    """Within the block, every Conv3d of `model` checks its bf16 weight gradient (see the module doc)."""
    convs = [module for module in model.modules() if isinstance(module, nn.Conv3d)]
    for conv in convs:
        conv.forward = _checked_forward.__get__(conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward
