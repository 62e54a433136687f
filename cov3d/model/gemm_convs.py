"""fp32 CPU convolutions with few output voxels computed as one matrix product.

oneDNN's fp32 3D convolution is slow where the output has only a few voxels per scan: r3d_18's layer4
sees 2x2x2 voxels at the demo's fp32 size (16x32x32), where its backward pass reaches 13 GFLOP/s of the
AMD EPYC's 166 GFLOP/s peak and layer4 took a quarter of the training step (docs/benchmarks.md).
There, unfolding the padded input into one row per output voxel (``im2col``) and multiplying by the
weight matrix is 2-3x faster, forward and backward (autograd differentiates the unfold and the
product; the same function, up to fp32 rounding). Only fp32 CPU tensors outside autocast take this
route; everything else, and every convolution with ``GEMM_MAX_OUTPUT_VOXELS`` or more output voxels,
stays with ``F.conv3d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GEMM_MAX_OUTPUT_VOXELS = 27
"""Output voxels per scan (D' x H' x W') below which the matrix-product route is taken. Measured on the
AMD EPYC held to AVX2 (scripts/benchmark_peak.py --convs, docs/benchmarks.md): the 3x3x3 convolutions of
r3d_18's layer4 at 8 and 18 voxels are 1.6-3.2x faster by matrix product (two runs); from 32 voxels up
neither is reliably faster."""


def output_voxels(volume_shape: torch.Size | tuple[int, ...], conv: nn.Conv3d) -> int:
    """Voxels per scan of ``conv``'s output for an input of shape (B, C, D, H, W)."""
    sizes = (
        (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        for size, kernel, stride, padding, dilation in zip(
            volume_shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    )
    return math.prod(sizes)


def takes_gemm_route(conv: nn.Conv3d, volume: torch.Tensor) -> bool:
    """Whether ``conv`` of ``volume`` runs as a matrix product (see the module docstring)."""
    plain = (conv.groups == 1 and conv.dilation == (1, 1, 1) and conv.padding_mode == "zeros"
             and not isinstance(conv.padding, str))
    return (plain and volume.dim() == 5 and volume.shape[0] > 0 and volume.device.type == "cpu"
            and volume.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and output_voxels(volume.shape, conv) < GEMM_MAX_OUTPUT_VOXELS)


def conv3d_by_gemm(volume: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(volume)`` as im2col and one matrix product: (B, C, D, H, W) -> (B, O, D', H', W')."""
    (pad_d, pad_h, pad_w), (stride_d, stride_h, stride_w) = conv.padding, conv.stride
    kernel_d, kernel_h, kernel_w = conv.kernel_size
    padded = F.pad(volume, (pad_w, pad_w, pad_h, pad_h, pad_d, pad_d))
    # (B, C, D', H', W', kD, kH, kW) windows, then one row per output voxel in the weight's (C, kD, kH, kW) order
    windows = padded.unfold(2, kernel_d, stride_d).unfold(3, kernel_h, stride_h).unfold(4, kernel_w, stride_w)
    batch, _, depth, height, width = windows.shape[:5]
    rows = windows.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(batch * depth * height * width, -1)
    weight = conv.weight.reshape(conv.out_channels, -1)
    out = rows @ weight.t() if conv.bias is None else torch.addmm(conv.bias, rows, weight.t())
    return out.view(batch, depth, height, width, conv.out_channels).permute(0, 4, 1, 2, 3)


class GemmRoutedConv3d(nn.Conv3d):
    """A Conv3d that takes the matrix-product route where ``takes_gemm_route`` says so; the same
    parameters, names and initialisation as the Conv3d it was made from (``route_small_convs``)."""

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if takes_gemm_route(self, volume):
            return conv3d_by_gemm(volume, self)
        return self._conv_forward(volume, self.weight, self.bias)


def route_small_convs(model: nn.Module) -> nn.Module:
    """``model`` with each of its Conv3d modules made a ``GemmRoutedConv3d`` in place (its class only:
    parameters, buffers and the state dict are untouched)."""
    for module in model.modules():
        if type(module) is not GemmRoutedConv3d and isinstance(module, nn.Conv3d):
            module.__class__ = GemmRoutedConv3d
    return model
