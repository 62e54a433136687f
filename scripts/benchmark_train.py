"""Benchmark the training step: samples/s in fp32 vs bf16 autocast + channels-last 3D, fastai loop vs bare loop.

Builds a small synthetic dataset, preprocesses it into a temporary cache at the chosen size, and
trains r3d_18 (Cov3d head, combined loss, batch size 2 by default) on it four ways:

- fastai: the Learner exactly as `cov3d train` assembles it (its callbacks, 1cycle, metrics, progress bar);
- bare: a plain PyTorch loop over the same model, loss, batches and fastai's Adam;

each in fp32 and in bf16/channels-last, with deterministic kernels (`cov3d train`'s default); the fastai
loop also with `--no-deterministic` kernels (cuDNN autotuning, any kernel). Samples/s counts training batches after `--warmup` batches
(validation is not timed); with `--repeats N` every measurement is repeated N times, the loops in
alternating order, and the best is kept (on a shared machine the minimum time is the least disturbed). With `--device cuda` it also reports the peak GPU memory of a bf16 step
at the large size (160x320x320) for batch sizes 2, 4 and 8, through the same fastai path. Seeding and
the choice of kernels are those of `cov3d train` (``seed_everything``). Not a test: no asserts.

    python scripts/benchmark_train.py                       # small size, CPU
    python scripts/benchmark_train.py --size 32x64x64       # a quick check
    python scripts/benchmark_train.py --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from fastai.optimizer import Adam

from cov3d.runtime import autocast, resolve_device, resolve_precision, use_channels_last
from cov3d.settings import PRESETS, TrainSettings, VolumeShape
from cov3d.workflows.benchmark import fastai_loop, make_dataset, peak_memory, training_parts

MEMORY_BATCH_SIZES = (2, 4, 8)


def fast_kernels_loop(items, cache, settings, device, dtype, warmup: int) -> float:
    return fastai_loop(items, cache, settings, device, dtype, warmup, deterministic=False)


def bare_loop(items, cache, settings, device, dtype, warmup: int) -> float:
    dls, model, loss = training_parts(items, cache, settings, device)
    channels_last = use_channels_last(dtype)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    model.train()
    opt = Adam(list(model.parameters()), lr=settings.learning_rate, wd=settings.weight_decay)
    timed, start = 0, None
    for step, (volume, target) in enumerate(dls.train):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        volume, target = volume.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)
        if channels_last:
            volume = volume.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, dtype):
            prediction = model(volume)
        loss(prediction.float(), target).backward()
        opt.step()
        opt.zero_grad()
        timed += len(target) if step >= warmup else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timed / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="small, medium, large or DxHxW (default small = 64x128x128)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed training batches per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--repeats", type=int, default=1, help="repeat each measurement, keep the best")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, shape = resolve_device(args.device), VolumeShape.parse(args.size)
    settings = TrainSettings(shape=shape, batch_size=args.batch_size, epochs=1)
    print(f"device {device}, size {shape}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as work:
        items, cache = make_dataset(Path(work), shape, args.warmup + args.steps, args.batch_size)
        results: dict[tuple[str, str], float] = {}
        loops = (("bare", bare_loop), ("fastai", fastai_loop), ("fastai, not deterministic", fast_kernels_loop))
        for repeat in range(args.repeats):
            for precision, dtype in (("fp32", None), ("bf16+channels-last", torch.bfloat16)):
                for loop_name, loop in loops if repeat % 2 == 0 else loops[::-1]:
                    speed = loop(items, cache, settings, device, dtype, args.warmup)
                    results[precision, loop_name] = max(speed, results.get((precision, loop_name), 0.0))
                    print(f"{precision:<20} {loop_name:<26} {speed:8.3f} samples/s", flush=True)
    for loop_name in ("bare", "fastai"):
        speedup = results["bf16+channels-last", loop_name] / results["fp32", loop_name]
        print(f"bf16+channels-last / fp32 ({loop_name}): {speedup:.2f}x")
    for precision in ("fp32", "bf16+channels-last"):
        overhead = results[precision, "bare"] / results[precision, "fastai"] - 1
        print(f"fastai loop overhead vs bare ({precision}): {overhead * 100:+.1f}%")
        gain = results[precision, "fastai, not deterministic"] / results[precision, "fastai"]
        print(f"--no-deterministic / --deterministic (fastai, {precision}): {gain:.2f}x")
    if device.type == "cuda":
        dtype = resolve_precision("auto", device)
        with tempfile.TemporaryDirectory() as work:
            items, cache = make_dataset(Path(work), PRESETS["large"], 1, max(MEMORY_BATCH_SIZES))
            for batch_size in MEMORY_BATCH_SIZES:
                large = TrainSettings(shape=PRESETS["large"], batch_size=batch_size, epochs=1)
                print(f"peak GPU memory of a training step (fastai, autocast {dtype}), large {PRESETS['large']}, "
                      f"batch {batch_size}: {peak_memory(items, cache, large, device, dtype):.2f} GiB")


if __name__ == "__main__":
    main()
