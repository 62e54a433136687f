"""The matrix-product route for convolutions with few output voxels (cov3d.model.gemm_convs): the same
values and gradients as F.conv3d, taken only where it should be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cov3d.model.gemm_convs import (
    GEMM_MAX_OUTPUT_VOXELS,
    GemmRoutedConv3d,
    conv3d_by_gemm,
    output_voxels,
    route_small_convs,
    takes_gemm_route,
)
from cov3d.model.network import build_model


def _conv(in_channels, out_channels, kernel, stride, padding, bias):
    torch.manual_seed(0)
    return nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=bias)


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, padding, bias, shape", [
    (8, 6, 3, 1, 1, False, (2, 2, 2)),          # layer4's 3x3x3 at 2x2x2
    (8, 6, 3, 1, 1, True, (2, 3, 3)),           # with a bias, non-cubic
    (4, 6, 3, 2, 1, False, (4, 6, 5)),          # stride 2: layer4's first convolution
    (4, 6, 1, 2, 0, False, (4, 4, 4)),          # the 1x1x1 downsample
    (1, 5, (3, 7, 7), (1, 2, 2), (1, 3, 3), False, (2, 4, 4)),  # the stem's kernel
])
def test_values_and_gradients_equal_conv3d(in_channels, out_channels, kernel, stride, padding, bias, shape):
    conv = _conv(in_channels, out_channels, kernel, stride, padding, bias)
    volume = torch.randn(3, in_channels, *shape, dtype=torch.float64)
    conv = conv.double()
    reference_input = volume.clone().requires_grad_()
    reference = F.conv3d(reference_input, conv.weight, conv.bias, conv.stride, conv.padding)
    grad = torch.randn_like(reference)
    reference_weight_grad, *reference_bias_grad = torch.autograd.grad(
        reference, [conv.weight] + ([conv.bias] if bias else []), grad, retain_graph=True)
    (reference_input_grad,) = torch.autograd.grad(reference, reference_input, grad)

    routed_input = volume.clone().requires_grad_()
    routed = conv3d_by_gemm(routed_input, conv)
    assert routed.shape == reference.shape
    torch.testing.assert_close(routed, reference, rtol=1e-12, atol=1e-12)
    weight_grad, *bias_grad = torch.autograd.grad(
        routed, [conv.weight] + ([conv.bias] if bias else []), grad, retain_graph=True)
    (input_grad,) = torch.autograd.grad(routed, routed_input, grad)
    torch.testing.assert_close(weight_grad, reference_weight_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(input_grad, reference_input_grad, rtol=1e-12, atol=1e-12)
    for got, want in zip(bias_grad, reference_bias_grad):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_output_voxels_by_hand():
    conv = _conv(1, 1, (3, 7, 7), (1, 2, 2), (1, 3, 3), False)
    assert output_voxels((1, 1, 16, 32, 32), conv) == 16 * 16 * 16
    assert output_voxels((1, 1, 2, 3, 3), _conv(1, 1, 3, 1, 1, False)) == 18
    assert output_voxels((1, 1, 4, 6, 6), _conv(1, 1, 3, 2, 1, False)) == 2 * 3 * 3
    assert output_voxels((1, 1, 4, 4, 4), _conv(1, 1, 1, 2, 0, False)) == 8


def test_route_is_taken_only_for_few_voxels_in_fp32_on_the_cpu():
    conv = _conv(4, 4, 3, 1, 1, False)
    small, large = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 4, 4, 4)
    assert output_voxels(large.shape, conv) >= GEMM_MAX_OUTPUT_VOXELS > output_voxels(small.shape, conv)
    assert takes_gemm_route(conv, small)
    assert not takes_gemm_route(conv, large)
    assert not takes_gemm_route(conv.double(), small.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_gemm_route(conv.float(), small)
    assert not takes_gemm_route(conv, small[0])  # unbatched (C, D, H, W): F.conv3d takes it, not the route
    routed = route_small_convs(_conv(4, 4, 3, 1, 1, False))
    torch.testing.assert_close(routed(small[0]), F.conv3d(small, routed.weight, None, 1, 1)[0])
    grouped = nn.Conv3d(4, 4, 3, padding=1, groups=2)
    assert not takes_gemm_route(grouped, small)
    assert not takes_gemm_route(nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect"), small)


def test_the_network_routes_only_layer4_at_the_demo_fp32_size(monkeypatch):
    model = build_model(outputs=5, penultimate=8, dropout=0.0).eval()
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv3d)}
    assert convs and all(type(module) is GemmRoutedConv3d for module in convs.values())
    routed = []
    original = conv3d_by_gemm

    def counting(volume, conv):
        routed.append(conv)
        return original(volume, conv)

    monkeypatch.setattr("cov3d.model.gemm_convs.conv3d_by_gemm", counting)
    with torch.no_grad():
        model(torch.rand(1, 1, 16, 32, 32))
    names = {name for name, module in convs.items() if any(module is conv for conv in routed)}
    assert names == {name for name in convs if name.startswith("layer4.")}


def test_routing_keeps_the_state_dict_and_the_output():
    torch.manual_seed(0)
    model = build_model(outputs=5, penultimate=8, dropout=0.0).eval()
    plain = build_model(outputs=5, penultimate=8, dropout=0.0).eval()
    plain.load_state_dict(model.state_dict())
    for module in plain.modules():
        if isinstance(module, GemmRoutedConv3d):
            module.__class__ = nn.Conv3d
    assert list(model.state_dict()) == list(plain.state_dict())
    volume = torch.rand(2, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(volume), plain(volume), rtol=1e-4, atol=1e-5)
    assert route_small_convs(plain) is plain and all(
        type(module) is GemmRoutedConv3d for module in plain.modules() if isinstance(module, nn.Conv3d))


def test_channels_last_batch_of_one_and_uneven_strides():
    """Training hands channels-last volumes in; one scan, a bias and strides and padding per axis."""
    conv = route_small_convs(_conv(6, 5, (3, 1, 3), (1, 2, 2), (1, 0, 1), True))
    volume = torch.randn(1, 6, 2, 5, 4).contiguous(memory_format=torch.channels_last_3d)
    assert takes_gemm_route(conv, volume)
    torch.testing.assert_close(conv(volume), F.conv3d(volume, conv.weight, conv.bias, conv.stride, conv.padding),
                               rtol=1e-5, atol=1e-6)


def test_meta_tensors_and_empty_batches_stay_with_conv3d():
    conv = route_small_convs(_conv(4, 4, 3, 1, 1, False))
    assert not takes_gemm_route(conv, torch.empty(2, 4, 2, 2, 2, device="meta"))
    empty = torch.empty(0, 4, 2, 2, 2)
    assert not takes_gemm_route(conv, empty)
    assert conv(empty).shape == (0, 4, 2, 2, 2)
