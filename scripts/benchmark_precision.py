"""Benchmark the demo's training step on this CPU in fp32, bf16 as oneDNN computes it, bf16 with checked
convolution weight gradients repaired in fp32 only, and checked bf16 as `cov3d train` runs it (repaired
by explicit depth padding where that passes its probe), side by side in one process; with
`--reference-kernels` also bf16 with oneDNN off (torch's own kernels, minutes per step).

For each route: seconds per step (median of `--steps` after one warm-up step; the first checked step,
which runs the kernel probes, is reported apart) and the worst gradient of layer4, as its relative
distance from the fp32 gradient (bf16 rounding gives about 0.01-0.5 on an untrained network; the
broken kernel gives up to 1e36). Not a test: no asserts.

    python scripts/benchmark_precision.py                      # the demo's volume size, batch and network
    python scripts/benchmark_precision.py --size 64x128x128 --batch-size 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from cov3d.demo_settings import DemoSettings
from cov3d.runtime import cpu_bf16_features, cpu_model
from cov3d.settings import VolumeShape
from cov3d.training import bf16_convs
from cov3d.training.bf16_convs import checked_bf16_convs
from cov3d.workflows.benchmark import demo_step_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo = DemoSettings().with_workload("bf16")
    parser.add_argument("--size", default=str(demo.shape), help="DxHxW (default: the demo's bf16 volumes)")
    parser.add_argument("--batch-size", type=int, default=demo.batch_size)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--reference-kernels", action="store_true", help="Also time bf16 with oneDNN off (slow).")
    args = parser.parse_args()
    volume, target, loss_func, model = demo_step_parts(VolumeShape.parse(args.size), args.batch_size, demo)
    volume = volume.contiguous(memory_format=torch.channels_last_3d)
    model.to(memory_format=torch.channels_last_3d)

    def step(dtype) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(volume)
        loss_func(logits.float(), target).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if name.startswith("layer4")}

    print(f"CPU: {cpu_model()}; native bf16: {', '.join(cpu_bf16_features()) or 'none'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; size {args.size}, batch {args.batch_size}")
    reference = step(None)
    @contextlib.contextmanager
    def fp32_repair_only():
        with mock.patch.object(bf16_convs, "depth_padded", lambda geometry, conv: None), checked_bf16_convs(model):
            yield

    routes = {"fp32": (None, contextlib.nullcontext), "bf16 (oneDNN as is)": (torch.bfloat16, contextlib.nullcontext)}
    if args.reference_kernels:
        routes["bf16 without oneDNN"] = (torch.bfloat16, lambda: torch.backends.mkldnn.flags(enabled=False))
    routes["bf16 checked, fp32 repair"] = (torch.bfloat16, fp32_repair_only)
    routes["bf16 checked (cov3d)"] = (torch.bfloat16, lambda: checked_bf16_convs(model))
    print(f"{'route':<26} {'s/step':>8} {'first step':>11} {'layer4 grad error':>18}")
    for name, (dtype, context) in routes.items():
        bf16_convs._verdicts.clear()
        bf16_convs._padded_verdicts.clear()
        with context():
            start = time.perf_counter()
            grads = step(dtype)
            first = time.perf_counter() - start
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step(dtype)
                times.append(time.perf_counter() - start)
        error = max(float((grads[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
        print(f"{name:<26} {statistics.median(times):8.3f} {first:11.3f} {error:18.3g}", flush=True)
    failed = [key for key, right in bf16_convs._verdicts.items() if not right]
    print(f"checked route: {len(failed)} of {len(bf16_convs._verdicts)} convolution geometries failed the probe"
          + "".join(f"\n  input {list(key[0])} weight {list(key[2])}: repaired "
                    + ("by explicit depth padding" if bf16_convs._padded_verdicts.get(key) else "in fp32")
                    for key in failed))


if __name__ == "__main__":
    main()
