"""Benchmark `cov3d infer` end to end (JPEG folder -> CSV row) at the small size (64x128x128).

For synthetic scans (``cov3d.synthetic.generator``) and an untrained run with both weight files (the cost of
a model does not depend on its training), it measures, each from a fresh cache:

1. preprocessing alone: ``VolumeCache.get`` of every scan, in this process;
2. the model alone: ``Ensemble.predict`` on the preprocessed volumes, with and without the
   reflection test-time augmentation (TTA);
3. end to end: ``cov3d.inference.infer.infer`` with background preprocessing workers, with and without TTA.

It prints scans per second, the shares of preprocessing and model time, and whether the end to
end time is within ``OVERLAP_LIMIT`` x (preprocessing + model), i.e. whether the pipeline overlaps
rather than adds. Usage (from the repository root; PYTHONPATH=. for an uninstalled checkout):
python3 scripts/benchmark_infer.py [--scans 4] [--slice-size 256] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cov3d.dataset.scans import find_scans
from cov3d.inference.ensemble import Ensemble
from cov3d.inference.infer import infer
from cov3d.model.files import load_source
from cov3d.model.network import build_model
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runfiles import WEIGHTS_FILES
from cov3d.settings import PRESETS, VolumeShape
from cov3d.synthetic.generator import generate_dataset

OVERLAP_LIMIT = 1.2
"""End to end must take at most this multiple of (preprocessing + model) measured separately."""
MIN_DATASET_SCANS = 12
"""Scans generated (generate_dataset needs enough to split them); the first --scans are used."""


def make_run(folder: Path, size: tuple[int, int, int]) -> Path:
    """An untrained run folder at ``size`` with presence and severity weights."""
    folder.mkdir(parents=True)
    depth, height, width = size
    config = {"depth": depth, "height": height, "width": width, "outputs": 6, "penultimate": 512, "dropout": 0.5,
              "pool": "max", "final_bias": False}
    (folder / "config.json").write_text(json.dumps(config))
    for name in WEIGHTS_FILES.values():
        state = build_model().state_dict()
        save_file({key: value.contiguous() for key, value in state.items()}, str(folder / name))
    return folder


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--slice-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    size = PRESETS["small"].dims
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root / "data", scans=max(args.scans, MIN_DATASET_SCANS), seed=0, slice_size=args.slice_size)
        scans = find_scans([root / "data"])[: args.scans]
        slices = sum(len(list(scan.iterdir())) for scan in scans)
        run = make_run(root / "run", size)
        print(f"{len(scans)} scans, {slices} slices of {args.slice_size}x{args.slice_size}, size {size}, "
              f"{torch.get_num_threads()} torch threads, {args.workers} preprocessing worker(s)")

        cache = VolumeCache(root / "cache-alone", VolumeShape(*size))
        prep_s, volumes = timed(lambda: [cache.levels(scan) for scan in scans])
        results = {}
        for reflect in (True, False):
            ensemble = Ensemble([load_source(run)], torch.device("cpu"), None, reflect=reflect)
            key = ensemble.shapes[0]
            batches = [volumes[i:i + args.batch_size] for i in range(0, len(volumes), args.batch_size)]
            model_s, _ = timed(lambda: [ensemble.predict({key: torch.stack(batch)}) for batch in batches])
            label = "tta" if reflect else "no-tta"
            end_s, _ = timed(lambda: infer(
                scans, run, root / f"{label}.csv", cache_dir=root / f"cache-{label}", device="cpu", precision="fp32",
                batch_size=args.batch_size, workers=args.workers, reflect=reflect, progress=False,
            ))
            results[label] = (model_s, end_s)

        print(f"preprocessing alone: {prep_s:.2f} s ({len(scans) / prep_s:.2f} scans/s)")
        for label, (model_s, end_s) in results.items():
            separate = prep_s + model_s
            verdict = "overlaps" if end_s <= OVERLAP_LIMIT * separate else "ADDS"
            print(
                f"{label:>6}: model alone {model_s:.2f} s; end to end {end_s:.2f} s = {len(scans) / end_s:.3f} scans/s; "
                f"preprocessing {prep_s / separate:.0%} / model {model_s / separate:.0%} of the separate total {separate:.2f} s; "
                f"end to end / separate = {end_s / separate:.2f} (limit {OVERLAP_LIMIT}: {verdict})"
            )


if __name__ == "__main__":
    main()
