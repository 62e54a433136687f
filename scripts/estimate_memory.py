"""Estimate the GPU memory of a training step at each size and precision (``cov3d.training.memory``, the
estimate ``cov3d train`` checks against free memory): per scan, at batch 2, and the largest batch for common
GPU sizes. Counts on the meta device: runs in seconds on any CPU, no GPU needed.

    python scripts/estimate_memory.py                # the three presets, fp32 / bf16 / fp16
    python scripts/estimate_memory.py --size 96x192x192
"""

from __future__ import annotations

import argparse

import torch

from cov3d.settings import PRESETS, TrainSettings, VolumeShape
from cov3d.training.memory import GIB, estimate_training_memory

GPU_MEMORY_GIB = {"16 GB (V100)": 15.77, "32 GB (V100)": 31.74, "40 GB (A100)": 39.39, "80 GB (A100, H100)": 79.15,
                  "141 GB (H200)": 139.8}
"""Total memory of common GPUs as ``torch.cuda.get_device_properties(...).total_memory`` reports it, in GiB."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", help="small, medium, large or DxHxW (repeatable; default the presets)")
    args = parser.parse_args()
    shapes = [VolumeShape.parse(size) for size in args.size] if args.size else list(PRESETS.values())
    print("| size | precision | per scan (GiB) | batch 2 (GiB) | " + " | ".join(f"largest batch, {gpu}" for gpu in GPU_MEMORY_GIB) + " |")
    print("|---" * (4 + len(GPU_MEMORY_GIB)) + "|")
    for shape in shapes:
        settings = TrainSettings(shape=shape)
        for name, dtype in PRECISIONS.items():
            if name == "fp16":  # the same bytes as bf16
                continue
            estimate = estimate_training_memory(settings, dtype)
            batches = [estimate.largest_batch(int(gib * GIB)) for gib in GPU_MEMORY_GIB.values()]
            label = "bf16 / fp16" if name == "bf16" else name
            print(f"| {shape} | {label} | {estimate.per_sample / GIB:.2f} | {estimate.total(2) / GIB:.1f} | "
                  + " | ".join(map(str, batches)) + " |", flush=True)


if __name__ == "__main__":
    main()
