"""bf16 training on CPUs with 3D convolution weight gradients that are checked against fp32.

Some oneDNN bf16 backward-weights kernels return garbage for some convolution geometries (on AVX-512
BF16 CPUs without AMX, inputs two slices deep, as r3d_18's layer4 sees for 16-slice volumes; the
measurements are in docs/numerics.md), so no geometry is trusted blindly: the first time a
convolution runs under CPU bf16 autocast with a given input shape, layout and parameters, its bf16
weight gradient on random data is compared with the fp32 one (``bf16_weight_grad_is_right``). Where
it is wrong, ``Conv3dWithRepairedWeightGrad`` computes it another way (forward pass and input
gradient unchanged): in bf16 on an input padded with the convolution's zero slices explicitly (a
depth the kernel computes right) when that passes its own probe, else in fp32 from the same bf16
tensors (slower: docs/numerics.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from types import SimpleNamespace

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
"""Per geometry: whether this CPU's bf16 weight gradient is right."""
_padded_verdicts: dict[Geometry, bool] = {}
"""Per geometry that failed: whether the depth-padded bf16 weight gradient is right."""


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


def depth_padded(geometry: Geometry, conv: nn.Conv3d) -> tuple[Geometry, SimpleNamespace] | None:
    """The geometry and convolution parameters of the depth-padded route (see the module docstring):
    the input ``padding[0]`` slices deeper on each side, no depth padding. ``None`` when the
    convolution has no depth padding (nothing to move) or pads other than with zeros."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.padding[0] == 0:
        return None
    shape = list(geometry[0])
    shape[2] += 2 * conv.padding[0]
    padded = _without_depth_padding(conv)
    return (tuple(shape), *geometry[1:4], padded.padding, *geometry[5:]), padded


def _without_depth_padding(conv: nn.Conv3d) -> SimpleNamespace:
    """``conv``'s parameters as ``_weight_grad`` reads them, with no padding along depth."""
    return SimpleNamespace(stride=conv.stride, padding=(0, *conv.padding[1:]), dilation=conv.dilation, groups=conv.groups)


def _padded_weight_grad(volume, weight, out_grad, conv: nn.Conv3d) -> torch.Tensor:
    """``_weight_grad`` with the depth padding made explicit (the same values; see the module docstring)."""
    depth = conv.padding[0]
    padded_volume = F.pad(volume, (0, 0, 0, 0, depth, depth))
    if volume.is_contiguous(memory_format=torch.channels_last_3d) and not volume.is_contiguous():
        padded_volume = padded_volume.contiguous(memory_format=torch.channels_last_3d)
    return _weight_grad(padded_volume, weight, out_grad, _without_depth_padding(conv))


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


class Conv3dWithRepairedWeightGrad(torch.autograd.Function):
    """conv3d of bf16 tensors whose backward computes the weight gradient depth-padded in bf16
    (``padded``) or in fp32.

    Forward: volume (B, C, D, H, W) and weight (O, C/g, kD, kH, kW), both bf16 -> (B, O, D', H', W') bf16.
    Backward: the input gradient in bf16 as usual; the weight gradient in fp32 (the master weights' dtype).
    """

    @staticmethod
    def forward(ctx, volume, weight, conv: nn.Conv3d, padded: bool):
        ctx.save_for_backward(volume, weight)
        ctx.conv, ctx.padded = conv, padded
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
            if ctx.padded:
                weight_grad = _padded_weight_grad(volume, weight, out_grad.to(volume.dtype), conv).float()
            else:
                weight_grad = _weight_grad(volume.float(), weight.float(), out_grad.float(), conv)
        return volume_grad, weight_grad, None, None


def _checked_forward(conv: nn.Conv3d, volume: torch.Tensor) -> torch.Tensor:
    """Conv3d.forward, except under CPU bf16 autocast with gradients on a geometry that failed its probe."""
    if not (torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and conv.weight.requires_grad):
        return conv._conv_forward(volume, conv.weight, conv.bias)
    geometry = conv_geometry(volume, conv)
    if geometry not in _verdicts:
        _verdicts[geometry] = bf16_weight_grad_is_right(geometry, conv)
    if _verdicts[geometry]:
        return conv._conv_forward(volume, conv.weight, conv.bias)
    if geometry not in _padded_verdicts:
        padded = depth_padded(geometry, conv)
        _padded_verdicts[geometry] = padded is not None and bf16_weight_grad_is_right(*padded)
        logger.info(
            "This CPU's bf16 weight gradient is wrong for a convolution of input %s and weight %s; "
            "that gradient is computed %s.", list(geometry[0]), list(geometry[2]),
            "in bf16 with its depth padding made explicit" if _padded_verdicts[geometry] else "in fp32")
    with torch.autocast("cpu", enabled=False):
        output = Conv3dWithRepairedWeightGrad.apply(
            volume.to(torch.bfloat16), conv.weight.to(torch.bfloat16), conv, _padded_verdicts[geometry])
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
