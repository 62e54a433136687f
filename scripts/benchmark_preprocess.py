"""Benchmark cov3d preprocessing against the decode+resize floor and a naive per-pixel spline.

Generates synthetic 512x512 chest-CT-like JPEG stacks (body, lungs that grow and shrink along
the scan, spine, smooth texture and noise), then reports, per size:

- floor: decode and bicubic-resize every slice with PIL, nothing else;
- cov3d: ``preprocess_scan`` (float32 volume in memory) and a cache build
  (``VolumeCache.update`` with no entry: fingerprint, uint8 levels, CRC, atomic write to disk);
- load: reading that entry back with all its checks (``VolumeCache.load``: fingerprint, CRC, float32);
- fast: ``preprocess_scan(fast_decode=True)`` and its max / mean abs difference to the normal path;
- naive (small only): the floor plus one scipy ``CubicSpline`` per pixel column, measured once;
  also the depth interpolation alone: per-pixel splines vs cov3d's matrix product
  (``interpolate_depth`` on the same resized uint8 stack); stored max|d| is the largest
  difference between the cached (uint8 levels / 255) cov3d volume and the naive result, and
  naive/fast the speed-up of ``fast_decode`` over the naive reference;
- throughput of ``preprocess_many`` with 1 and 2 worker processes, with the machine's load
  (other users' processes take cores away), and the CPU seconds per scan in a worker when one
  or two run at once (the speed-up 2 free cores would give, independent of that load);
- peak RSS (VmHWM of a child process) for a 1,201-slice scan at large.

Times are wall-clock seconds per scan, the minimum over ``--repeats`` runs (floor, cov3d, cache
and fast taking turns), in one process with ``--threads`` torch threads (default 1, as in a
worker process). Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.interpolate import CubicSpline

from cov3d.dataset.scans import list_slices
from cov3d.preprocessing.preprocess import VolumeCache, interpolate_depth, preprocess_scan
from cov3d.preprocessing.workers import preprocess_many
from cov3d.settings import PRESETS, VolumeShape

SLICE_SIZE = 512
"""In-plane size of the generated slices (COV19-CT-DB slices are usually 512x512)."""

JPEG_QUALITY = 90
"""JPEG quality of the generated slices."""

TEXTURE_SIZE = 64
"""Size of the random texture that is upsampled to SLICE_SIZE (smooth structures)."""


def texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth random field (SLICE_SIZE, SLICE_SIZE) in about [-1, 1]."""
    coarse = Image.fromarray(rng.normal(0, 1, (TEXTURE_SIZE, TEXTURE_SIZE)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((SLICE_SIZE, SLICE_SIZE), Image.Resampling.BICUBIC)) / 2


def phantom_slice(position: float, textures: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One axial slice at ``position`` in [0, 1] along the scan, uint8 (SLICE_SIZE, SLICE_SIZE)."""
    y, x = np.mgrid[-1 : 1 : SLICE_SIZE * 1j, -1 : 1 : SLICE_SIZE * 1j]
    lung_scale = 0.3 + 0.7 * np.sin(np.pi * position)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    lungs = ((np.abs(x) - 0.38) / (0.26 * lung_scale)) ** 2 + ((y + 0.05) / (0.42 * lung_scale)) ** 2 < 1
    spine = x**2 + (y - 0.45) ** 2 < 0.1**2
    angle = 3 * np.pi * position
    detail = np.cos(angle) * textures[0] + np.sin(angle) * textures[1]
    image = np.where(body, 0.45 + 0.05 * detail, 0.02)
    image = np.where(lungs & body, 0.1 + 0.08 * np.clip(detail, 0, None), image)
    image = np.where(spine, 0.9, image) + rng.normal(0, 0.02, image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def make_stack(folder: Path, n_slices: int, seed: int) -> Path:
    """Write (once) a stack of n JPEG slices to ``folder``."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n_slices:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    textures = (texture(rng), texture(rng))
    for index in range(n_slices):
        position = index / max(n_slices - 1, 1)
        Image.fromarray(phantom_slice(position, textures, rng)).save(folder / f"{index}.jpg", quality=JPEG_QUALITY)
    return folder


def best_time(function: Callable[[], object], repeats: int) -> float:
    """Minimum wall-clock seconds of ``function`` over ``repeats`` runs."""
    return best_times([function], repeats)[0]


def best_times(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Minimum wall-clock seconds of each function over ``repeats`` rounds that run them all in
    turn, so that a slow spell of the machine touches every candidate alike."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return [min(samples) for samples in times]


def floor(scan: Path, height: int, width: int) -> np.ndarray:
    """Decode and bicubic-resize every slice (PIL), nothing else: (n, H, W) uint8."""
    return np.stack(
        [np.asarray(Image.open(path).resize((width, height), Image.Resampling.BICUBIC)) for path in list_slices(scan)]
    )


def naive_interpolation(stack: np.ndarray, depth: int) -> np.ndarray:
    """One scipy CubicSpline per pixel column of an (n, H, W) uint8 stack: (D, H, W) in [0, 1]."""
    stack = stack / 255.0
    height, width = stack.shape[1:]
    positions, targets = np.linspace(0, 1, len(stack)), np.linspace(0, 1, depth)
    volume = np.empty((depth, height, width))
    for row in range(height):
        for column in range(width):
            volume[:, row, column] = CubicSpline(positions, stack[:, row, column])(targets)
    return volume.clip(0, 1)


def cache_build(scan: Path, cache_dir: Path, size: tuple[int, int, int]) -> None:
    """Build one cache entry from scratch, as a ``preprocess_many`` worker does."""
    VolumeCache(cache_dir, VolumeShape(*size)).path_for(scan).unlink(missing_ok=True)
    VolumeCache(cache_dir, VolumeShape(*size)).update(scan)


def time_sizes(stacks: list[Path], work: Path, args: argparse.Namespace) -> None:
    """Print the per-scan table for every size and stack."""
    print(f"\nSeconds per scan (min of {args.repeats}), {torch.get_num_threads()} torch thread(s)")
    header = f"{'size':<7}{'slices':>7}{'floor':>8}{'cov3d':>8}{'ratio':>7}{'cache':>8}{'ratio':>7}{'load':>7}"
    print(header + f"{'fast':>8}{'fast max|d|':>13}{'fast mean|d|':>14}{'naive':>8}{'naive/cov3d':>12}{'naive/fast':>11}{'stored max|d|':>14}"
          f"{'splines':>9}{'matrix':>9}{'ratio':>8}")
    for name, shape in PRESETS.items():
        size = shape.dims
        depth, height, width = size
        for scan in stacks:
            n_slices = len(list_slices(scan))
            t_floor, t_cov3d, t_cache, t_fast = best_times(
                [
                    lambda: floor(scan, height, width),
                    lambda: preprocess_scan(scan, *size),
                    lambda: cache_build(scan, work / "bench-cache", size),
                    lambda: preprocess_scan(scan, *size, fast_decode=True),
                ],
                args.repeats,
            )
            t_load = best_time(lambda: VolumeCache(work / "bench-cache", VolumeShape(*size)).load(scan), args.repeats)
            difference = (preprocess_scan(scan, *size) - preprocess_scan(scan, *size, fast_decode=True)).abs()
            row = (
                f"{name:<7}{n_slices:>7}{t_floor:>8.3f}{t_cov3d:>8.3f}{t_cov3d / t_floor:>7.2f}{t_cache:>8.3f}"
                f"{t_cache / t_floor:>7.2f}{t_load:>7.3f}{t_fast:>8.3f}{float(difference.max()):>13.4f}{float(difference.mean()):>14.5f}"
            )
            if name == "small":
                start = time.perf_counter()
                stack = floor(scan, height, width)
                reference = naive_interpolation(stack, depth)
                t_naive = time.perf_counter() - start
                t_spline = time.perf_counter() - start - t_floor
                t_matrix = best_time(lambda: interpolate_depth(stack, depth), args.repeats)
                cached = VolumeCache(work / "bench-cache", VolumeShape(*size)).get(scan)[0].numpy()
                row += (
                    f"{t_naive:>8.2f}{t_naive / t_cov3d:>12.1f}{t_naive / t_fast:>11.1f}{np.abs(cached - reference).max():>14.2e}"
                    f"{t_spline:>9.2f}{t_matrix:>9.4f}{t_spline / t_matrix:>8.0f}"
                )
            print(row, flush=True)


def time_throughput(stack: Path, work: Path, args: argparse.Namespace) -> None:
    """preprocess_many over ``--scans`` copies of a stack (linked files) with 1 and 2 workers."""
    size = PRESETS[args.throughput_size].dims
    scans = []
    for index in range(args.scans):
        scan = work / "throughput" / f"ct_scan_{index}"
        if not scan.is_dir():
            scan.mkdir(parents=True)
            for path in list_slices(stack):
                (scan / path.name).symlink_to(path)
        scans.append(scan)
    n_slices = len(list_slices(stack))
    print(f"\nThroughput: {args.scans} scans of {n_slices} slices at {args.throughput_size}, load before: {os.getloadavg()[0]:.1f}")
    results = {}
    for workers in (1, 2):
        if workers > 1:  # start the worker server once (it imports torch), as any long run does
            start = time.perf_counter()
            preprocess_many(scans[:workers], VolumeCache(work / "throughput-cache-1", VolumeShape(*size)), workers=workers, progress=False)
            print(f"  one-time start of the worker server: {time.perf_counter() - start:.2f} s (not counted below)")
        cache_dir = work / f"throughput-cache-{workers}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        machine_before = machine_busy_seconds()
        start = time.perf_counter()
        summary = preprocess_many(scans, VolumeCache(cache_dir, VolumeShape(*size)), workers=workers, progress=False)
        results[workers] = time.perf_counter() - start
        busy = (machine_busy_seconds() - machine_before) / results[workers]
        print(
            f"  {workers} worker(s): {results[workers]:6.2f} s, {args.scans / results[workers]:5.2f} scans/s "
            f"(processed {summary.processed}, failed {len(summary.failed)}); "
            f"whole machine busy {busy:.2f} of {os.cpu_count()} cores (all processes, ours and others)"
        )
    start = time.perf_counter()
    preprocess_many(scans, VolumeCache(work / "throughput-cache-2", VolumeShape(*size)), workers=2, progress=False)
    resume = time.perf_counter() - start
    print(f"  2 workers vs 1: {results[1] / results[2]:.2f}x (worker start-up included); load after: {os.getloadavg()[0]:.1f}")
    print(f"  resume (all {args.scans} up to date, 2 workers): {resume:.2f} s, i.e. about the cost of starting 2 workers")
    print(f"  2 workers vs 1 without that start-up: {results[1] / max(results[2] - resume, 1e-9):.2f}x")
    cpu = {}
    for workers in (1, 2):
        cache = VolumeCache(work / f"cpu-cache-{workers}", VolumeShape(*size))
        shutil.rmtree(cache.cache_dir, ignore_errors=True)
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            cpu[workers] = float(np.mean(list(pool.map(cpu_seconds_of_update, [cache] * len(scans), scans))))
    print(
        f"  CPU seconds per scan inside a worker: {cpu[1]:.3f} alone, {cpu[2]:.3f} with 2 running at once; "
        f"so 2 free cores would give about {2 * cpu[1] / cpu[2]:.2f}x"
    )


def cpu_seconds_of_update(cache: VolumeCache, scan: Path) -> float:
    """CPU seconds this process spends on ``cache.update(scan)`` (run in a worker)."""
    start = time.process_time()
    cache.update(scan)
    return time.process_time() - start


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


PEAK_RSS_CHILD = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from cov3d.preprocessing.preprocess import VolumeCache, preprocess_scan
    mode, scan, cache_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "scan":
        preprocess_scan(scan, *PRESETS["large"].dims)
    elif mode == "cache":
        VolumeCache(cache_dir, PRESETS["large"]).get(scan)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(status["VmHWM"].split()[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def peak_rss(stack: Path, work: Path) -> None:
    """Peak RSS (MiB) of child processes: imports only, preprocess_scan, and a cache build.

    The peak is the child's own VmHWM (/proc/self/status). Its ru_maxrss is printed too, but
    Linux starts a child's ru_maxrss at the parent's RSS when the child is exec'd from a vfork,
    so it can show this (large) benchmark process instead.
    """
    n_slices = len(list_slices(stack))
    print(f"\nPeak RSS of a child process, {n_slices}-slice 512x512 scan at large")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    for mode, label in [("import", "imports only (torch, scipy, PIL)"), ("scan", "preprocess_scan"), ("cache", "cache build")]:
        shutil.rmtree(work / "rss-cache", ignore_errors=True)
        start = time.perf_counter()
        output = subprocess.run(
            [sys.executable, "-c", PEAK_RSS_CHILD, mode, str(stack), str(work / "rss-cache")],
            env=env, capture_output=True, text=True, check=True,
        )
        seconds = time.perf_counter() - start
        hwm_kib, maxrss_kib = (int(value) for value in output.stdout.split()[-2:])
        print(f"  {label:<36}VmHWM {hwm_kib / 1024:6.0f} MiB  (ru_maxrss {maxrss_kib / 1024:.0f} MiB)  {seconds:5.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cov3d-benchmark",
                        help="Where the generated stacks and caches go (kept between runs).")
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300], help="Slices per benchmark stack.")
    parser.add_argument("--repeats", type=int, default=5, help="Runs per timing (the minimum is reported).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (workers use 1).")
    parser.add_argument("--scans", type=int, default=16, help="Scans in the throughput test.")
    parser.add_argument("--throughput-size", choices=list(PRESETS), default="medium", help="Size for the throughput test.")
    parser.add_argument("--throughput-slices", type=int, default=300, help="Slices per scan in the throughput test.")
    parser.add_argument("--rss-slices", type=int, default=1201, help="Slices of the peak-RSS scan (0 skips it).")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sizes", "throughput", "rss"], help="Parts to skip.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = args.workdir
    print(f"cov3d preprocessing benchmark: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, workdir {work}")
    stacks = {n: make_stack(work / f"stack_{n}", n, seed=n) for n in {*args.slices, args.throughput_slices}}
    if "sizes" not in args.skip:
        time_sizes([stacks[n] for n in args.slices], work, args)
    if "throughput" not in args.skip:
        time_throughput(stacks[args.throughput_slices], work, args)
    if "rss" not in args.skip and args.rss_slices:
        peak_rss(make_stack(work / f"stack_{args.rss_slices}", args.rss_slices, seed=args.rss_slices), work)


if __name__ == "__main__":
    main()
