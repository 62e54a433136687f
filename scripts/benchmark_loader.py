"""Benchmark what the training loader does per item and per batch, without the model.

Builds a few synthetic scans, preprocesses them into a temporary cache at the chosen size, and
times, in interleaved rounds (the minimum over rounds is kept):

- ``get``: ``VolumeCache.get``, the full route: list the scan, fingerprint its slices, load
  the entry, check its CRC, convert to float32 (what inference uses);
- ``checked``: ``VolumeCache.checked_levels``, what the training loader reads: load the entry
  and check it and its CRC, as uint8, without touching the scan's slices;
- ``batch``: one training batch from the loader (items, reflection, collation, conversion to
  float32 values on the device by ``LevelsToValues``), loader processes off.

It also prints the bytes a batch carries from the loader to the device as uint8 and as float32.
Not a test: no asserts.

    python scripts/benchmark_loader.py                 # large (160x320x320)
    python scripts/benchmark_loader.py --size small
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import preprocess_many
from cov3d.settings import PRESETS, VolumeShape
from cov3d.synthetic.generator import generate_dataset
from cov3d.training.data import collect_items
from cov3d.training.distributed import Distributed
from cov3d.training.loaders import training_loaders


def record_time(action, rounds: list[float]) -> None:
    start = time.perf_counter()
    action()
    rounds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="large", choices=sorted(PRESETS))
    parser.add_argument("--scans", type=int, default=8, help="synthetic scans (a fifth go to validation)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    depth, height, width = PRESETS[args.size].dims
    with tempfile.TemporaryDirectory() as work:
        generate_dataset(Path(work) / "data", scans=args.scans, test_scans=0, seed=0, slice_size=width, depth_scale=1.0)
        items = collect_items(Path(work) / "data")
        cache = VolumeCache(Path(work) / "cache", VolumeShape(depth, height, width))
        preprocess_many([item.path for item in items], cache, progress=False)
        slices = sum(len(list(item.path.glob("*.jpg"))) for item in items) / len(items)
        dls = training_loaders(items, cache, batch_size=args.batch_size, reflect=True, device=torch.device("cpu"),
                               workers=0, dist=Distributed())
        times: dict[str, list[float]] = {"get": [], "checked": [], "batch": []}
        for _ in range(args.rounds):
            for item in items:
                record_time(lambda: cache.get(item.path), times["get"])
                record_time(lambda: cache.checked_levels(item.path), times["checked"])
            batches = iter(dls.train)
            for _ in range(len(dls.train)):
                record_time(lambda: next(batches), times["batch"])
    print(f"size {args.size} ({depth}x{height}x{width}), {len(items)} scans of {slices:.0f} slices on average, "
          f"min of {args.rounds} rounds")
    for name, label in (("get", "VolumeCache.get (float32)"), ("checked", "checked_levels (uint8)"),
                        ("batch", f"training batch of {args.batch_size}")):
        print(f"{label:<28} {min(times[name]) * 1e3:8.1f} ms   (median {sorted(times[name])[len(times[name]) // 2] * 1e3:.1f} ms)")
    voxels = args.batch_size * depth * height * width
    print(f"batch to the device: {voxels / 2**20:.0f} MiB as uint8, {4 * voxels / 2**20:.0f} MiB as float32")


if __name__ == "__main__":
    main()
