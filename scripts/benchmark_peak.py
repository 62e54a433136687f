"""fp32 speed against the machine's limit: the achieved GFLOP/s of a demo-size training step next to the
peak that the CPU implies.

FLOPs are counted from the network's convolutions (forward hooks record each Conv3d's output shape):
a forward pass costs 2 * batch * C_out * output voxels * C_in * kernel volume per convolution, its
backward twice that (input and weight gradients; the stem has no input gradient, since the volume
needs none). The peak is cores * clock * fp32 lanes of the FMA datapath * 2 FLOPs per FMA * 2 FMA
pipes per core, from `lscpu` (model name, cores, `CPU max MHz` or else the current clock, flags). The
datapath is 512 bits with `avx512f`, except on AMD family 25 (Zen 3, Zen 4), which runs 512-bit
instructions on 256-bit pipes; 256 bits with `avx2` and `fma`; 128 otherwise. Two FMA pipes per core is
true of current x86 server cores (some Intel Xeon Silver and Bronze parts have one 512-bit pipe: the
ratio is then half the truth). A clock above the nominal one (turbo) can push the ratio past 100 %.

    python scripts/benchmark_peak.py                         # the demo's fp32 workload (16x32x32, batch 4)
    python scripts/benchmark_peak.py --size 16x48x48 --bf16  # also time bf16 autocast (no peak modelled)
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python scripts/benchmark_peak.py                     # as an AVX2-only CPU (oneDNN, ATen and MKL held)
    python scripts/benchmark_peak.py --convs                 # one convolution: oneDNN against the matrix product

Each step is a whole training step as `cov3d train` runs it: forward, the Cov3d loss, backward and the
optimiser (torch's fused AdamW, and fastai's Adam for comparison; and in fp32 without the matrix-product
route of ``cov3d.model.gemm_convs``, oneDNN for every convolution), median of `--steps` after two warm-up
steps. `--convs` times forward and backward of single convolutions of r3d_18's shapes both ways, the
measurement behind ``GEMM_MAX_OUTPUT_VOXELS``. Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import time

import torch

from cov3d.demo_settings import DemoSettings
from cov3d.model.gemm_convs import output_voxels, route_small_convs
from cov3d.runtime import cpu_bf16_features
from cov3d.settings import FASTAI_ADAM, FUSED_ADAMW, VolumeShape
from cov3d.training.bf16_convs import checked_bf16_convs
from cov3d.training.optimizer import optimizer_function
from cov3d.workflows.benchmark import demo_step_parts

FMA_PIPES = 2
"""FMA pipes per core assumed for the peak (see the module docstring)."""
FLOPS_PER_FMA = 2


def conv_flops(model: torch.nn.Module, volume: torch.Tensor) -> tuple[int, int]:
    """(forward, backward) FLOPs of the model's Conv3d layers for ``volume`` (B, 1, D, H, W)."""
    counted: list[tuple[torch.nn.Conv3d, torch.Size]] = []
    hooks = [module.register_forward_hook(lambda module, inputs, output: counted.append((module, output.shape)))
             for module in model.modules() if isinstance(module, torch.nn.Conv3d)]
    try:
        with torch.no_grad():
            model(volume)
    finally:
        for hook in hooks:
            hook.remove()
    forward = backward = 0
    for index, (conv, shape) in enumerate(counted):
        kernel = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2]
        flops = FLOPS_PER_FMA * shape.numel() * kernel
        forward += flops
        backward += flops if index == 0 else 2 * flops  # the stem's input (the volume) needs no gradient
    return forward, backward


def lscpu() -> dict[str, str]:
    """`lscpu`'s fields (empty where it is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in out.splitlines())}


def fp32_peak(fields: dict[str, str]) -> dict[str, float | int | str]:
    """Cores, clock (GHz), FMA datapath bits and the fp32 peak (GFLOP/s) that `lscpu`'s fields imply."""
    flags = set(fields.get("Flags", "").split())
    cores = int(fields.get("Core(s) per socket", "1")) * int(fields.get("Socket(s)", "1"))
    mhz = fields.get("CPU max MHz") or fields.get("CPU MHz") or cpuinfo_mhz()
    family = int(fields.get("CPU family", "0") or 0)
    amd_half_width = fields.get("Vendor ID") == "AuthenticAMD" and family == 25
    bits = 512 if "avx512f" in flags and not amd_half_width else 256 if {"avx2", "fma"} <= flags else 128
    ghz = float(mhz) / 1000
    peak = cores * ghz * (bits // 32) * FLOPS_PER_FMA * FMA_PIPES
    return {"model": fields.get("Model name", "unknown CPU"), "cores": cores, "ghz": ghz, "bits": bits, "peak": peak,
            "bf16_flags": " ".join(sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})) or "none",
            "avx512": "yes" if "avx512f" in flags else "no"}


def cpuinfo_mhz() -> str:
    """The clock /proc/cpuinfo reports (its first `cpu MHz`), for an `lscpu` without one."""
    with contextlib.suppress(OSError):
        match = re.search(r"cpu MHz\s*:\s*([0-9.]+)", open("/proc/cpuinfo").read())
        if match:
            return match.group(1)
    return "1000"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo = DemoSettings().with_workload("fp32")
    parser.add_argument("--size", default=str(demo.shape), help="DxHxW (default: the demo's fp32 volumes)")
    parser.add_argument("--batch-size", type=int, default=demo.batch_size)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="Also time the step under bf16 autocast.")
    parser.add_argument("--convs", action="store_true", help="Time single convolutions (oneDNN and matrix product).")
    args = parser.parse_args()
    if args.convs:
        time_convs(args.steps)
        return
    volume, target, loss_func, model = demo_step_parts(VolumeShape.parse(args.size), args.batch_size, demo)
    forward, backward = conv_flops(model, volume)
    cpu = fp32_peak(lscpu())
    print(f"CPU: {cpu['model']}; {cpu['cores']} cores at {cpu['ghz']:.2f} GHz; AVX-512: {cpu['avx512']}; "
          f"bf16 flags: {cpu['bf16_flags']}; native bf16 for cov3d: {', '.join(cpu_bf16_features()) or 'none'}")
    print(f"fp32 peak: {cpu['cores']} cores x {cpu['ghz']:.2f} GHz x {cpu['bits'] // 32} lanes ({cpu['bits']}-bit FMA) "
          f"x {FLOPS_PER_FMA} x {FMA_PIPES} pipes = {cpu['peak']:.0f} GFLOP/s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; size {args.size}, batch {args.batch_size}: "
          f"{(forward + backward) / 1e9:.1f} GFLOP of convolutions a step ({forward / 1e9:.1f} forward)")

    routes = {"fp32": (None, FUSED_ADAMW, True), "fp32, oneDNN only": (None, FUSED_ADAMW, False),
              "fp32, fastai's Adam": (None, FASTAI_ADAM, True),
              **({"bf16": (torch.bfloat16, FUSED_ADAMW, True)} if args.bf16 else {})}
    for name, (dtype, optimizer_name, gemm_route) in routes.items():
        set_gemm_route(model, gemm_route)
        channels_last = dtype is not None
        step_model = model.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        step_volume = volume.contiguous(memory_format=torch.channels_last_3d) if channels_last else volume
        opt_func = optimizer_function(optimizer_name, step_model, demo.train_settings().weight_decay)
        optimizer = opt_func(list(step_model.parameters()), lr=1e-4)

        def step() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = step_model(step_volume)
            loss_func(logits.float(), target).backward()
            optimizer.step()
            optimizer.zero_grad()

        with checked_bf16_convs(step_model) if dtype is not None else contextlib.nullcontext():
            seconds = median_seconds(step, args.steps)
        achieved = (forward + backward) / seconds / 1e9
        share = f" = {100 * achieved / cpu['peak']:.0f} % of the fp32 peak" if dtype is None else " (no bf16 peak modelled)"
        print(f"{name:<20} {seconds:.3f} s a step, {achieved:.0f} GFLOP/s{share}", flush=True)


def median_seconds(step, steps: int) -> float:
    """The median time of ``steps`` calls of ``step`` after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def set_gemm_route(model: torch.nn.Module, on: bool) -> None:
    """Turn the matrix-product route of ``cov3d.model.gemm_convs`` on or off for every Conv3d of ``model``."""
    if on:
        route_small_convs(model)
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.__class__ = torch.nn.Conv3d


CONV_SHAPES = [  # (input channels, output channels, stride, input D, H, W): r3d_18's 3x3x3 convolutions, batch 4
    (512, 512, 1, (2, 2, 2)), (512, 512, 1, (2, 3, 3)), (256, 512, 2, (4, 4, 4)), (256, 512, 2, (4, 6, 6)),
    (256, 256, 1, (2, 4, 4)), (256, 256, 1, (4, 4, 4)), (256, 256, 1, (4, 6, 6)), (128, 128, 1, (8, 8, 8)),
]
DOWNSAMPLE_SHAPES = [(256, 512, 2, (4, 4, 4)), (256, 512, 2, (4, 6, 6))]
"""(input channels, output channels, stride, input D, H, W): layer4's 1x1x1 downsample, batch 4."""


def time_convs(steps: int) -> None:
    """Forward and backward of single convolutions, oneDNN against the matrix product (milliseconds)."""
    print("kernel, input channels -> output, stride, input D x H x W: output voxels; oneDNN ms; matrix product ms")
    shapes = [(*shape, 3) for shape in CONV_SHAPES] + [(*shape, 1) for shape in DOWNSAMPLE_SHAPES]
    for in_channels, out_channels, stride, dims, kernel in shapes:
        conv = torch.nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
        volume = torch.randn(4, in_channels, *dims)
        times = []
        for on in (False, True):
            set_gemm_route(conv, on)

            def step() -> None:
                conv.weight.grad = volume.grad = None
                conv(volume.requires_grad_()).sum().backward()

            times.append(1e3 * median_seconds(step, steps))
        print(f"{kernel}x{kernel}x{kernel}, {in_channels} -> {out_channels}, stride {stride}, {'x'.join(map(str, dims))}: "
              f"{output_voxels(volume.shape, conv)} voxels; {times[0]:.1f}; {times[1]:.1f} ({times[0] / times[1]:.2f}x)",
              flush=True)


if __name__ == "__main__":
    main()
