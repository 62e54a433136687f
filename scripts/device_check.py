"""Check cov3d's accelerator paths in one short run and print what was measured.

Meant for a machine with a CUDA GPU (the test suite runs on CPUs only); ``--device cpu`` runs the
same checks on a CPU. Each check prints one line starting with ``ok`` or ``FAIL``; the exit code
is 1 if any failed. The checks:

1. uint8 levels become the same float32 values on the device as on the CPU (``values_on`` and
   the training loader's ``LevelsToValues``), bit for bit;
2. a short training run (synthetic data, ``--precision auto``: bf16/fp16 autocast on GPUs) ends
   with finite losses and writes its weights;
3. inference of that run under autocast agrees with fp32 (max |difference| of P(COVID-19));
4. peak device memory of one bf16 training step at the large size (160x320x320), batch 2 and 4.

Throughput (samples/s) is measured by ``scripts/benchmark_train.py --device cuda``.

    python scripts/device_check.py                  # on a GPU machine, about 2 minutes
    python scripts/device_check.py --device cpu --no-memory
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from cov3d.dataset.scans import find_scans
from cov3d.inference.infer import infer
from cov3d.preprocessing.cache import from_levels, values_on
from cov3d.preprocessing.preprocess import SIZES
from cov3d.runtime import resolve_device, resolve_precision
from cov3d.synthetic.generator import generate_dataset
from cov3d.training.data import LevelsToValues, TensorCT
from cov3d.training.train import TrainSettings, train

AUTOCAST_TOLERANCE = 0.05
"""Largest |P(covid) under autocast - P(covid) in fp32| accepted for an untrained-ish tiny model."""


def report(ok: bool, line: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {line}", flush=True)
    return ok


def check_levels(device: torch.device) -> bool:
    levels = torch.randint(0, 256, (2, 1, 8, 32, 32), dtype=torch.uint8)
    expected = from_levels(levels)
    on_device = values_on(levels, device)
    batch = LevelsToValues()(TensorCT(levels.to(device)))
    same = torch.equal(on_device.cpu(), expected) and torch.equal(batch.as_subclass(torch.Tensor).cpu(), expected)
    return report(same, f"uint8 levels -> float32 values on {device}: identical to the CPU's")


def check_training(work: Path, device: torch.device, size: tuple[int, int, int], epochs: int) -> Path | None:
    generate_dataset(work / "data", scans=24, seed=0, slice_size=max(size[2], 32), depth_scale=0.1)
    settings = TrainSettings(depth=size[0], height=size[1], width=size[2], epochs=epochs, penultimate=16)
    start = time.perf_counter()
    result = train(work / "data", work / "run", settings, cache_dir=work / "cache", pretrained=False,
                   device=str(device), precision="auto")
    seconds = time.perf_counter() - start
    with (work / "run" / "metrics.csv").open() as handle:
        losses = [float(row[name]) for row in csv.DictReader(handle) for name in ("train_loss", "valid_loss")]
    finite = all(math.isfinite(loss) for loss in losses) and bool(result.best_scores)
    dtype = resolve_precision("auto", device)
    report(finite, f"training, {epochs} epochs at {'x'.join(map(str, size))} with autocast {dtype}: {seconds:.1f} s, "
                   f"losses {', '.join(f'{loss:.3f}' for loss in losses)}")
    return work / "run" if finite else None


def check_inference(work: Path, run: Path, device: torch.device) -> bool:
    scans = find_scans([work / "data" / "test"])
    probabilities = {}
    for precision in ("fp32", "auto"):
        output = work / f"preds-{precision}.csv"
        infer(scans, run, output, cache_dir=work / "cache", device=str(device), precision=precision, progress=False)
        with output.open() as handle:
            probabilities[precision] = [float(row["covid_probability"]) for row in csv.DictReader(handle)]
    gap = max(abs(a - b) for a, b in zip(probabilities["fp32"], probabilities["auto"]))
    return report(gap <= AUTOCAST_TOLERANCE, f"inference of {len(scans)} scans, autocast vs fp32: "
                                            f"max |dP(covid)| = {gap:.4f} (limit {AUTOCAST_TOLERANCE})")


def check_memory(device: torch.device) -> bool:
    sys.path.insert(0, str(Path(__file__).parent))
    from benchmark_train import peak_memory

    size = SIZES["large"]
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    results = []
    for batch in (2, 4):
        try:
            line = f"{peak_memory(device, size, batch):.2f} GiB"
        except torch.cuda.OutOfMemoryError:
            line = "out of memory"
        results.append(report(line != "out of memory", f"peak memory of a bf16 step at large {size}, batch {batch}: "
                                                        f"{line} of {total:.0f} GiB"))
    return all(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="16x64x64", help="DxHxW of the training check (default 16x64x64)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the large-size memory check")
    args = parser.parse_args()
    device = resolve_device(args.device)
    size = tuple(int(n) for n in args.size.lower().split("x"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}", flush=True)
    results = [check_levels(device)]
    with tempfile.TemporaryDirectory() as work:
        run = check_training(Path(work), device, size, args.epochs)
        results.append(run is not None)
        if run is not None:
            results.append(check_inference(Path(work), run, device))
    if device.type == "cuda" and not args.no_memory:
        results.append(check_memory(device))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
