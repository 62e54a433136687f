"""scripts/benchmark_peak.py: its FLOP count against torch's own counter, its peak against a hand count."""

import pytest
import torch
from scripts_loader import load_script
from torch.utils.flop_counter import FlopCounterMode

from cov3d.model.network import build_model


@pytest.fixture(scope="module")
def script():
    return load_script("benchmark_peak")


def test_conv_flops_match_torchs_flop_counter(script):
    """The hooks' count of a training step equals torch's FlopCounterMode over forward and backward
    (its convolution entries: the head's matrix products are left out), with every convolution in oneDNN."""
    model = build_model(outputs=6, penultimate=16, dropout=0.0, pretrained_weights=None)
    script.set_gemm_route(model, False)
    volume = torch.rand(2, 1, 8, 24, 24)
    forward, backward = script.conv_flops(model, volume)
    counter = FlopCounterMode(display=False)
    with counter:
        model(volume).sum().backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert forward == counts["aten.convolution"]
    assert backward == counts["aten.convolution_backward"]


def test_routed_convolutions_do_the_same_flops_as_matrix_products(script):
    """With the small convolutions routed to matrix products (cov3d.model.gemm_convs), the forward pass's convolutions and
    matrix products add up to the hooks' count, plus the head's last layer (a product without bias)."""
    model = build_model(outputs=6, penultimate=16, dropout=0.0, pretrained_weights=None)
    volume = torch.rand(2, 1, 8, 24, 24)
    forward, _ = script.conv_flops(model, volume)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(volume)
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    head_product = 2 * 2 * 16 * 6
    assert counts["aten.mm"] > head_product  # layer4 and layer3 (2x3x3 voxels here) went by matrix product
    assert forward == counts["aten.convolution"] + counts["aten.mm"] - head_product


@pytest.mark.parametrize("vendor, family, flags, bits", [
    ("GenuineIntel", "6", "fma avx2 avx512f amx_bf16", 512),
    ("AuthenticAMD", "25", "fma avx2 avx512f avx512_bf16", 256),  # Zen 4: 512-bit instructions on 256-bit pipes
    ("AuthenticAMD", "23", "fma avx2", 256),
    ("GenuineIntel", "6", "sse4_2", 128),
])
def test_the_fp32_peak_by_hand(script, vendor, family, flags, bits):
    fields = {"Model name": "X", "Vendor ID": vendor, "CPU family": family, "Core(s) per socket": "2",
              "Socket(s)": "1", "CPU MHz": "2500.000", "Flags": flags}
    peak = script.fp32_peak(fields)
    assert peak["bits"] == bits
    assert peak["peak"] == pytest.approx(2 * 2.5 * (bits / 32) * 2 * 2)


def test_the_fp32_demo_does_under_a_third_of_the_bf16_demos_convolution_work(script):
    """cov3d.demo_settings.DEMO_WORKLOADS' rule, counted by the hooks: a step at 16x32x32 does 4/9 of the
    convolution FLOPs of one at 16x48x48, and fp32's 5 epochs of 72 steps (480 scans, 60 % for training) are
    360 steps against bf16's 11 epochs of 48 (320 scans): 30 % of the work in all."""
    from cov3d.demo_settings import DemoSettings
    from cov3d.synthetic.generator import _split_sizes

    model = build_model(outputs=6, penultimate=128, dropout=0.0, pretrained_weights=None)
    script.set_gemm_route(model, False)

    def work(precision: str) -> tuple[int, int]:
        demo = DemoSettings().with_workload(precision)
        steps = _split_sizes(demo.scans, None)["train"] // demo.batch_size * demo.epochs
        return steps, sum(script.conv_flops(model, torch.zeros(1, 1, *demo.shape.dims)))

    (fp32_steps, fp32_flops), (bf16_steps, bf16_flops) = work("fp32"), work("bf16")
    assert (fp32_steps, bf16_steps) == (360, 528)
    assert fp32_flops / bf16_flops == pytest.approx(4 / 9, rel=1e-3)
    assert fp32_steps * fp32_flops / (bf16_steps * bf16_flops) == pytest.approx(0.303, abs=0.001)
