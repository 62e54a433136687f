"""The `cov3d` command line: parses options, calls the library, turns user mistakes into one-line errors."""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import typer

from .errors import Cov3dError

app = typer.Typer(
    help="Cov3d: detect COVID-19 and grade its severity from chest CT scans with a 3D ResNet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SIZE_NAMES = "small (64x128x128), medium (128x256x256) or large (160x320x320)"
CacheDirOption = typer.Option(None, "--cache-dir", help="Where preprocessed tensors are kept. Default: $COV3D_CACHE_DIR or ~/.cache/cov3d.")
WorkersOption = typer.Option(None, "--workers", min=1, help="Parallel preprocessing processes. Default: all CPU cores.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda.")
PrecisionOption = typer.Option("auto", "--precision", help="auto (bf16 where fast), fp32, bf16 or fp16 (CUDA only).")


def fail(message: str) -> None:
    """Print a one-line error and exit with status 1."""
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def user_errors(command: Callable) -> Callable:
    """Show Cov3dError as a single line (no traceback) and exit non-zero."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Cov3dError as error:
            fail(str(error))

    return wrapper


def resolve_size(size: Optional[str], depth: Optional[int], height: Optional[int], width: Optional[int]) -> tuple[int, int, int]:
    """(D, H, W) from a size name or explicit numbers; H defaults to W, D to W / 2 (paper §3.1)."""
    from .preprocess import SIZES

    if size is not None:
        if size not in SIZES:
            raise Cov3dError(f"Unknown size '{size}': choose {SIZE_NAMES}.")
        if depth or height or width:
            raise Cov3dError("Give either --size or --depth/--height/--width, not both.")
        return SIZES[size]
    width = width or SIZES["small"][2]
    height = height or width
    depth = depth or width // 2
    return depth, height, width


def cache_directory(cache_dir: Optional[Path]) -> Path:
    from .preprocess import default_cache_dir

    return cache_dir if cache_dir is not None else default_cache_dir()


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    if shard is None:
        return None
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise Cov3dError(f"--shard must look like I/N (e.g. 0/4), got '{shard}'.") from None
    if not 0 <= index < count:
        raise Cov3dError(f"--shard {shard}: I must be between 0 and N-1.")
    return index, count


@app.command()
@user_errors
def preprocess(
    data: list[Path] = typer.Argument(None, help="Scan folders, or folders that contain scan folders (searched recursively). Default: the current folder."),
    size: Optional[str] = typer.Option(None, "--size", help=f"Preset: {SIZE_NAMES}."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="Slices after interpolation. Default: width / 2."),
    height: Optional[int] = typer.Option(None, "--height", min=1, help="Slice height in pixels. Default: the width."),
    width: Optional[int] = typer.Option(None, "--width", min=1, help="Slice width in pixels. Default: 128."),
    cache_dir: Optional[Path] = CacheDirOption,
    workers: Optional[int] = WorkersOption,
    strict: bool = typer.Option(False, "--strict", help="Stop at the first scan that fails."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Process only part I of N (e.g. 0/4), for cluster job arrays."),
    fast_decode: bool = typer.Option(False, "--fast-decode", help="Decode JPEGs at reduced scale (faster, slightly different values)."),
):
    """Resize JPEG slice stacks to fixed D x H x W tensors (bicubic in-plane, cubic along depth) and cache them."""
    from .preprocess import VolumeCache, preprocess_many
    from .scans import find_scans

    depth, height, width = resolve_size(size, depth, height, width)
    scans = find_scans(data or [Path(".")])
    cache = VolumeCache(cache_directory(cache_dir), depth, height, width, fast_decode=fast_decode)
    summary = preprocess_many(scans, cache, workers=workers, strict=strict, shard=parse_shard(shard))
    for path, reason in summary.failed:
        typer.secho(f"Failed {path}: {reason}", fg=typer.colors.RED, err=True)
    typer.echo(
        f"{depth}x{height}x{width} in {cache.cache_dir}: {summary.processed} processed, "
        f"{summary.skipped} up to date, {len(summary.failed)} failed."
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def train(
    directory: Optional[Path] = typer.Option(None, "--directory", "-d", help="Dataset folder with train/, validation/ and the two severity CSVs."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder for weights, config and metrics. Default: outputs/run-<time>."),
    depth: int = typer.Option(64, "--depth", min=1, help="Slices per scan after interpolation (paper: 64, 128 or 160)."),
    width: int = typer.Option(128, "--width", min=1, help="Slice width (paper: 128, 256 or 320)."),
    height: Optional[int] = typer.Option(None, "--height", min=1, help="Slice height. Default: the width."),
    epochs: int = typer.Option(40, "--epochs", min=1, help="Epochs of the 1cycle schedule (paper: 30, 40 or 50)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Scans per batch (paper: 2)."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", help="Maximum learning rate of 1cycle (paper: 1e-4)."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="Adam weight decay (paper: 1e-5)."),
    severity_factor: float = typer.Option(0.5, "--severity-factor", min=0.0, max=1.0, help="lambda in eq. 6: 0 trains presence only, 1 severity only."),
    presence_smoothing: float = typer.Option(0.1, "--presence-smoothing", min=0.0, max=0.5, help="Label smoothing eps_p for presence (paper: 0 or 0.1)."),
    severity_smoothing: float = typer.Option(0.1, "--severity-smoothing", min=0.0, max=0.5, help="Label smoothing eps_s for severity, shared by neighbouring classes (paper: 0 or 0.1)."),
    penultimate: int = typer.Option(512, "--penultimate", min=1, help="Size of the head's hidden layer."),
    dropout: float = typer.Option(0.5, "--dropout", min=0.0, max=1.0, help="Dropout after each ResNet layer and in the head."),
    pool: str = typer.Option("avg", "--pool", help="Global pooling before the head: avg or max."),
    reflect: bool = typer.Option(True, "--reflect/--no-reflect", help="Random sagittal reflection in training."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Start from Kinetics-400 weights (paper) or from scratch."),
    pretrained_weights: Optional[Path] = typer.Option(None, "--pretrained-weights", help="A torchvision r3d_18 Kinetics-400 state-dict file."),
    seed: int = typer.Option(0, "--seed", help="Random seed: runs with the same seed on a CPU give identical metrics."),
    cache_dir: Optional[Path] = CacheDirOption,
    workers: Optional[int] = WorkersOption,
    loader_workers: Optional[int] = typer.Option(None, "--loader-workers", min=0, help="Batch-loading processes per training process. Default: 0 on CPU, up to 4 per GPU."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    wandb: bool = typer.Option(False, "--wandb", help="Log to Weights & Biases (WANDB_MODE=offline works)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the killed run in this folder from its last epoch (its data and settings are reused)."),
):
    """Train the Cov3d model (r3d_18, combined loss, Adam with 1cycle) and keep the best weights for each task."""
    from .train import TrainSettings, resume_training, train as run_training

    if resume is not None:
        result = resume_training(
            resume, cache_dir=cache_directory(cache_dir), device=device, precision=precision, workers=workers,
            loader_workers=loader_workers, use_wandb=wandb,
        )
        typer.echo(f"Run written to {result.run_dir} (best: {format_scores(result.best_scores)}).")
        return
    if directory is None:
        raise Cov3dError("Give --directory DATA (or --resume RUN_DIR to continue a run).")
    if pool not in ("avg", "max"):
        raise Cov3dError(f"--pool must be avg or max, got '{pool}'.")
    if pretrained_weights is not None and not pretrained_weights.is_file():
        raise Cov3dError(f"--pretrained-weights {pretrained_weights}: no such file.")
    settings = TrainSettings(
        depth=depth, height=height or width, width=width, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, weight_decay=weight_decay, severity_factor=severity_factor,
        presence_smoothing=presence_smoothing, severity_smoothing=severity_smoothing,
        penultimate=penultimate, dropout=dropout, pool=pool, reflect=reflect, seed=seed,
    )
    run_dir = output_dir or Path("outputs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    result = run_training(
        directory, run_dir, settings, cache_dir=cache_directory(cache_dir),
        pretrained_weights=pretrained_weights, pretrained=pretrained, device=device,
        precision=precision, workers=workers, loader_workers=loader_workers, use_wandb=wandb,
    )
    typer.echo(f"Run written to {result.run_dir} (best: {format_scores(result.best_scores)}).")


def format_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())


@app.command()
@user_errors
def infer(
    scans: list[Path] = typer.Argument(..., help="Scan folders, or folders that contain scan folders."),
    model: Path = typer.Option(..., "--model", "-m", help="A run folder written by 'cov3d train'."),
    output: Path = typer.Option(Path("predictions.csv"), "--output", "-o", help="CSV file for the predictions."),
    submission_dir: Optional[Path] = typer.Option(None, "--submission-dir", help="Also write the competition files (covid.csv, non-covid.csv, mild.csv, ...)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Scans per forward pass."),
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
):
    """Predict COVID-19 presence and severity for scans (mean over each scan and its reflection)."""
    from .infer import infer as run_inference
    from .scans import find_scans

    scan_dirs = find_scans(scans)
    rows, failed = run_inference(
        scan_dirs, model, output, cache_dir=cache_directory(cache_dir), device=device,
        precision=precision, batch_size=batch_size, submission_dir=submission_dir,
    )
    for path, reason in failed:
        typer.secho(f"Failed {path}: {reason}", fg=typer.colors.RED, err=True)
    covid = sum(row["covid"] == "1" for row in rows)
    typer.echo(f"{len(rows)} scans predicted ({covid} with COVID-19) -> {output}")
    if failed:
        raise typer.Exit(1)
