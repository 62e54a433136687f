"""`cov3d preprocess`, `prune-cache`, `synthetic`, `show` and `stats`: the commands that make, check and
look at data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cov3d.cli.common import (
    CacheDirOption,
    DepthOption,
    DeviceOption,
    FastDecodeOption,
    HeightOption,
    ModelWindowOption,
    OverwriteOption,
    PrecisionOption,
    WarpOption,
    WidthOption,
    WindowOption,
    WorkersOption,
    app,
    cache_directory,
    parse_shard,
    parse_window,
    size_option,
    user_errors,
)
from cov3d.settings import (
    PRESET_NAMES,
    SYNTHETIC_DEFAULTS,
    VolumeShape,
)
from cov3d.window import DEFAULT_WINDOW, MODEL_WINDOW


@app.command("preprocess")
@user_errors
def preprocess_command(
    data: list[Path] = typer.Argument(None, help="Scan folders, or folders that contain scan folders (searched recursively). Default: the current folder."),
    size: Optional[str] = size_option("small"),
    depth: Optional[int] = DepthOption,
    height: Optional[int] = HeightOption,
    width: Optional[int] = WidthOption,
    cache_dir: Optional[Path] = CacheDirOption,
    workers: Optional[int] = WorkersOption,
    strict: bool = typer.Option(False, "--strict", help="Stop at the first scan that fails."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Process only part I of N (e.g. 0/4), for cluster job arrays."),
    fast_decode: bool = FastDecodeOption,
    warp: float = WarpOption,
    window: Optional[str] = WindowOption,
):
    """Resize JPEG slice stacks to fixed D x H x W tensors (bicubic in-plane, cubic along depth) and cache them."""
    from cov3d.dataset.scans import find_scans
    from cov3d.limits import WORKERS
    from cov3d.preprocessing.preprocess import VolumeCache
    from cov3d.preprocessing.workers import preprocess_many

    shape = VolumeShape.from_options(size, depth, height, width, fast_decode=fast_decode, warp=warp,
                                     window=parse_window(window, DEFAULT_WINDOW))
    WORKERS.check("workers", workers)
    cache = VolumeCache(cache_directory(cache_dir), shape)
    scans = find_scans(data or [Path(".")])
    summary = preprocess_many(scans, cache, workers=workers, strict=strict, shard=parse_shard(shard))
    for path, reason in summary.failed:
        typer.secho(f"Failed {path}: {reason}", fg=typer.colors.RED, err=True)
    typer.echo(
        f"{shape.folder_name} in {cache.cache_dir}: {summary.processed} processed, "
        f"{summary.skipped} up to date, {len(summary.failed)} failed."
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command("prune-cache")
@user_errors
def prune_cache_command(
    cache_dir: Optional[Path] = CacheDirOption,
    missing_scans: bool = typer.Option(False, "--missing-scans", help="Also remove entries whose scan folder or file no longer exists (not while a data drive is unmounted)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
):
    """Free the cache of entries that can never be read again: older format versions, damaged entries, leftovers of killed writers (only files that prove to be entries)."""
    from cov3d.preprocessing.cache import prune_cache

    directory = cache_directory(cache_dir)
    summary = prune_cache(directory, missing_scans=missing_scans, dry_run=dry_run)
    for path, reason in summary.removed:
        typer.echo(f"{'Would remove' if dry_run else 'Removed'} {path}: {reason}")
    count = len(summary.removed)
    typer.echo(
        f"{directory}: {count} file{'' if count == 1 else 's'} {'to remove' if dry_run else 'removed'} "
        f"({summary.freed_bytes / 2**20:.1f} MiB), {summary.kept} entries kept."
    )

@app.command("synthetic")
@user_errors
def synthetic_command(
    output: Path = typer.Argument(..., help="Folder to write the dataset to (must not hold a dataset already)."),
    scans: int = typer.Option(SYNTHETIC_DEFAULTS.scans, "--scans", help="Number of scans, all splits together."),
    seed: int = typer.Option(SYNTHETIC_DEFAULTS.seed, "--seed", help="Random seed: the same seed gives the same files."),
    slice_size: int = typer.Option(SYNTHETIC_DEFAULTS.slice_size, "--slice-size", help="Slice width and height in pixels (real data: 512)."),
    depth_scale: float = typer.Option(SYNTHETIC_DEFAULTS.depth_scale, "--depth-scale", help="Scale of the slice-count distribution (1.0 = like COV19-CT-DB)."),
    masks: bool = typer.Option(False, "--masks", help="Also write each scan's lesion and lung masks to lesion-masks/ (.npz)."),
):
    """Write a synthetic chest-CT dataset in the COV19-CT-DB layout (train, validation, unlabelled test + answer key)."""
    from cov3d.synthetic.generator import generate_dataset

    summary = generate_dataset(output, scans=scans, seed=seed, slice_size=slice_size, depth_scale=depth_scale, masks=masks)
    typer.echo(f"{summary.total_scans} synthetic scans written to {output}.")

@app.command("show")
@user_errors
def show_command(
    scans: list[Path] = typer.Argument(..., help="Scans (JPEG slice folders, DICOM series folders, NIfTI files), folders of them, and cached tensor files (.pt)."),
    output: Path = typer.Option(Path("scans.png"), "--output", "-o", help="PNG file for the figure."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A run folder: add its prediction to each row."),
    size: Optional[str] = typer.Option(None, "--size", help=(
        f"Show scan folders as preprocessed at {PRESET_NAMES} (from the cache, as training reads them). "
        "Default: at 256x256 with their own slices (at most 256), or what --depth/--height/--width give.")),
    depth: Optional[int] = DepthOption,
    height: Optional[int] = HeightOption,
    width: Optional[int] = WidthOption,
    fast_decode: bool = FastDecodeOption,
    window: Optional[str] = ModelWindowOption,
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    overwrite: bool = OverwriteOption,
):
    """Draw the axial, sagittal and coronal mid-planes of scans, one row per scan, with label or prediction."""
    from cov3d.inference.views import show_scans

    preprocessed = size is not None or (depth, height, width) != (None, None, None) or fast_decode
    shape = VolumeShape.from_options(size, depth, height, width, fast_decode=fast_decode) if preprocessed else None
    titles = show_scans(scans, output, run_dir=model, cache_dir=cache_dir, device=device, precision=precision,
                        shape=shape, overwrite=overwrite, window=parse_window(window, MODEL_WINDOW))
    typer.echo(f"{len(titles)} scans -> {output}")


@app.command("stats")
@user_errors
def stats_command(
    data: Path = typer.Argument(..., help="Dataset folder (train/, validation/, test/ and the severity CSVs) or a folder of scans."),
    output: Path = typer.Option(Path("stats"), "--output", "-o", help="Folder for the tables (CSV) and the depth histogram."),
    overwrite: bool = OverwriteOption,
):
    """Count scans, slices, sizes and labels (paper Fig. 1, Tables 1-2) from file names and image headers."""
    from rich.console import Console

    from cov3d.dataset.stats import check_stats_output, dataset_stats, stats_report
    from cov3d.workflows.stats import write_stats

    result = dataset_stats(data)
    folder = check_stats_output(result, output, overwrite=overwrite)
    console = Console()
    for item in stats_report(result):
        console.print(item)
    write_stats(result, output, folder=folder)
    typer.echo(f"{len(result.scans)} scans, {len(result.warnings)} warnings -> {output}")
