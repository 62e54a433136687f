"""The `cov3d` command line: parses options, calls the library, turns user mistakes into one-line errors."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from cov3d.errors import Cov3dError

# Libraries that cov3d imports (fastai, via torch.jit) warn about their own internals on every run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

app = typer.Typer(
    help="Cov3d: detect COVID-19 and grade its severity from chest CT scans with a 3D ResNet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def show_progress_messages() -> None:
    """Show the library's progress messages (the ``cov3d`` logger, INFO and up) as plain lines on stderr."""
    logger = logging.getLogger("cov3d")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


SIZE_NAMES = "small (64x128x128), medium (128x256x256) or large (160x320x320)"
CacheDirOption = typer.Option(None, "--cache-dir", help="Where preprocessed tensors are kept. Default: $COV3D_CACHE_DIR or ~/.cache/cov3d.")
WorkersOption = typer.Option(None, "--workers", min=1, help="Parallel preprocessing processes. Default: all CPU cores.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda.")
WindowHelp = (
    "LEVEL,WIDTH in HU: how DICOM and NIfTI scans are mapped to grey levels (e.g. -470,1410). "
    "Default: {default}.")
WindowOption = typer.Option(None, "--window", help=WindowHelp.format(default="the mapping calibrated to COV19-CT-DB"))
ModelWindowOption = typer.Option(None, "--window", help=WindowHelp.format(
    default="the model's own (recorded in its config), else the mapping calibrated to COV19-CT-DB"))
PrecisionOption = typer.Option("auto", "--precision", help=(
    "auto, fp32, bf16 or fp16 (CUDA only). auto: on a CPU, bf16 when it has AMX-BF16 or AVX-512 BF16, else fp32 "
    "(emulated bf16 is slower); on a GPU, bf16 from compute capability 8.0 (A100, H100, RTX 30xx on), else fp16 "
    "with a gradient scaler (V100, T4). The choice is printed and kept in the run's config.json."))


def fail(message: str) -> None:
    """Print a one-line error and exit with status 1."""
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def user_errors(command: Callable) -> Callable:
    """Show Cov3dError, and any OSError (a folder that cannot be made, a full disk), as a single
    line (no traceback) and exit non-zero."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Cov3dError as error:
            fail(str(error))
        except OSError as error:
            from cov3d.errors import one_line

            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{one_line(error.strerror or error)}. Check the path, its permissions and the free disk space.")

    return wrapper


def resolve_size(size: Optional[str], depth: Optional[int], height: Optional[int], width: Optional[int]) -> tuple[int, int, int]:
    """(D, H, W) from a size name or explicit numbers; H defaults to W, D to W / 2 (paper §3.1)."""
    from cov3d.preprocessing.preprocess import SIZES

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
    from cov3d.preprocessing.preprocess import default_cache_dir

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
    window: Optional[str] = WindowOption,
):
    """Resize JPEG slice stacks to fixed D x H x W tensors (bicubic in-plane, cubic along depth) and cache them."""
    from cov3d.dataset.scans import find_scans
    from cov3d.preprocessing.preprocess import VolumeCache
    from cov3d.preprocessing.workers import preprocess_many

    depth, height, width = resolve_size(size, depth, height, width)
    scans = find_scans(data or [Path(".")])
    cache = VolumeCache(cache_directory(cache_dir), depth, height, width, fast_decode=fast_decode, window=window)
    summary = preprocess_many(scans, cache, workers=workers, strict=strict, shard=parse_shard(shard))
    for path, reason in summary.failed:
        typer.secho(f"Failed {path}: {reason}", fg=typer.colors.RED, err=True)
    typer.echo(
        f"{depth}x{height}x{width} in {cache.cache_dir}: {summary.processed} processed, "
        f"{summary.skipped} up to date, {len(summary.failed)} failed."
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command("prune-cache")
@user_errors
def prune_cache(
    cache_dir: Optional[Path] = CacheDirOption,
    missing_scans: bool = typer.Option(False, "--missing-scans", help="Also remove entries whose scan folder or file no longer exists (not while a data drive is unmounted)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
):
    """Free the cache of entries that can never be read again: older format versions, unreadable files, leftovers of killed writers."""
    from cov3d.preprocessing.cache import prune_cache as prune

    directory = cache_directory(cache_dir)
    summary = prune(directory, missing_scans=missing_scans, dry_run=dry_run)
    for path, reason in summary.removed:
        typer.echo(f"{'Would remove' if dry_run else 'Removed'} {path}: {reason}")
    count = len(summary.removed)
    typer.echo(
        f"{directory}: {count} file{'' if count == 1 else 's'} {'to remove' if dry_run else 'removed'} "
        f"({summary.freed_bytes / 2**20:.1f} MiB), {summary.kept} entries kept."
    )


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
    window: Optional[str] = typer.Option(None, "--window", help=WindowHelp.format(
        default="the mapping calibrated to COV19-CT-DB") + " Recorded in the run; inference uses it."),
):
    """Train the Cov3d model (r3d_18, combined loss, Adam with 1cycle) and keep the best weights for each task."""
    from cov3d.training.train import TrainSettings, resume_training, train as run_training

    if resume is not None:
        result = resume_training(
            resume, cache_dir=cache_directory(cache_dir), device=device, precision=precision, workers=workers,
            loader_workers=loader_workers, use_wandb=wandb,
        )
        typer.echo(f"Run written to {result.run_dir} (best: {format_scores(result.best_scores)}).")
        return
    if directory is None:
        raise Cov3dError("Give --directory DATA (or --resume RUN_DIR to continue a run).")
    if pretrained_weights is not None and not pretrained_weights.is_file():
        raise Cov3dError(f"--pretrained-weights {pretrained_weights}: no such file.")
    settings = TrainSettings(
        depth=depth, height=height or width, width=width, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, weight_decay=weight_decay, severity_factor=severity_factor,
        presence_smoothing=presence_smoothing, severity_smoothing=severity_smoothing,
        penultimate=penultimate, dropout=dropout, pool=pool, reflect=reflect, seed=seed,
        **({"window": window} if window is not None else {}),
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
    scans: list[Path] = typer.Argument(..., help="Scans (JPEG slice folders, DICOM series folders, NIfTI files) or folders that contain them."),
    model: list[Path] = typer.Option(..., "--model", "-m", help="A run folder of 'cov3d train', a file of 'cov3d export', or a folder of them. Repeat for an ensemble (probabilities are averaged)."),
    output: Path = typer.Option(Path("predictions.csv"), "--output", "-o", help="CSV file for the predictions, written row by row."),
    submission_dir: Optional[Path] = typer.Option(None, "--submission-dir", help="Also write the competition files (covid.csv, non-covid.csv, mild.csv, ...)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Scans per forward pass."),
    mc_samples: int = typer.Option(0, "--mc-samples", min=0, help="Monte-Carlo dropout samples per model; adds covid_probability_std and severity_agreement columns. 0: off."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows already in --output and predict only the other scans."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the Monte-Carlo dropout samples."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Average each scan with its sagittal reflection (paper) or not (twice as fast)."),
    window: Optional[str] = ModelWindowOption,
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Background preprocessing processes (0: in the main process). Default: half the CPU cores, at least 1."),
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
):
    """Predict COVID-19 presence and severity for scans (mean over each scan and its reflection, and over models)."""
    from cov3d.dataset.scans import find_scans
    from cov3d.inference.infer import infer as run_inference
    from cov3d.preprocessing.workers import available_cpus

    scan_dirs = find_scans(scans)
    summary = run_inference(
        scan_dirs, model, output, cache_dir=cache_directory(cache_dir), device=device,
        precision=precision, batch_size=batch_size, submission_dir=submission_dir, mc_samples=mc_samples,
        workers=workers if workers is not None else max(1, available_cpus() // 2), resume=resume, seed=seed, reflect=tta,
        window=window,
    )
    for path, reason in summary.failed:
        typer.secho(f"Failed {path}: {reason}", fg=typer.colors.RED, err=True)
    kept = f", {summary.resumed} already in the CSV" if summary.resumed else ""
    typer.echo(f"{summary.predicted} scans predicted ({summary.covid} with COVID-19){kept} -> {output}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'cov3d train' (or a model file to re-export)."),
    out: Path = typer.Argument(..., help="The model file to write (.safetensors), or an existing folder to write it in."),
):
    """Pack a run's config and weights into one safe, shareable model file (safetensors, no pickle)."""
    from cov3d.model.files import export_model

    written = export_model(run_dir, out)
    typer.echo(f"Model written to {written} ({written.stat().st_size / 2**20:.1f} MiB).")


@app.command()
@user_errors
def synthetic(
    output: Path = typer.Argument(..., help="Folder to write the dataset to (must not hold a dataset already)."),
    scans: int = typer.Option(120, "--scans", min=4, help="Number of scans, all splits together."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same files."),
    slice_size: int = typer.Option(128, "--slice-size", help="Slice width and height in pixels (real data: 512)."),
    depth_scale: float = typer.Option(0.1, "--depth-scale", min=0.0, help="Scale of the slice-count distribution (1.0 = like COV19-CT-DB)."),
    masks: bool = typer.Option(False, "--masks", help="Also write each scan's lesion and lung masks to lesion-masks/ (.npz)."),
):
    """Write a synthetic chest-CT dataset in the COV19-CT-DB layout (train, validation, unlabelled test + answer key)."""
    from cov3d.synthetic.generator import generate_dataset

    summary = generate_dataset(output, scans=scans, seed=seed, slice_size=slice_size, depth_scale=depth_scale, masks=masks)
    typer.echo(f"{summary.total_scans} synthetic scans written to {output}.")


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Folder for the dataset, cache, run and predictions."),
    scans: int = typer.Option(240, "--scans", min=20, help="Synthetic scans to generate."),
    epochs: int = typer.Option(16, "--epochs", min=1, help="Training epochs."),
    seed: int = typer.Option(0, "--seed", help="Random seed for the data and the training."),
    workers: Optional[int] = WorkersOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
):
    """Run the whole job on a synthetic dataset: generate, preprocess, train, infer, and score against a baseline."""
    from cov3d.synthetic.demo import DemoSettings, run_demo

    run_demo(output, DemoSettings(scans=scans, epochs=epochs, seed=seed), workers=workers, device=device, precision=precision)


@app.command()
@user_errors
def show(
    scans: list[Path] = typer.Argument(..., help="Scans (JPEG slice folders, DICOM series folders, NIfTI files), folders of them, and cached tensor files (.pt)."),
    output: Path = typer.Option(Path("scans.png"), "--output", "-o", help="PNG file for the figure."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A run folder: add its prediction to each row."),
    window: Optional[str] = ModelWindowOption,
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
):
    """Draw the axial, sagittal and coronal mid-planes of scans, one row per scan, with label or prediction."""
    from cov3d.inference.views import show_scans

    titles = show_scans(scans, output, run_dir=model, cache_dir=cache_dir, device=device, precision=precision, window=window)
    typer.echo(f"{len(titles)} scans -> {output}")


@app.command()
@user_errors
def stats(
    data: Path = typer.Argument(..., help="Dataset folder (train/, validation/, test/ and the severity CSVs) or a folder of scans."),
    output: Path = typer.Option(Path("stats"), "--output", "-o", help="Folder for the tables (CSV) and the depth histogram."),
):
    """Count scans, slices, sizes and labels (paper Fig. 1, Tables 1-2) from file names and image headers."""
    from cov3d.dataset.stats import dataset_stats, print_stats, write_stats

    result = dataset_stats(data)
    print_stats(result)
    write_stats(result, output)
    typer.echo(f"{len(result.scans)} scans, {len(result.warnings)} warnings -> {output}")


@app.command()
@user_errors
def explain(
    scan: Path = typer.Argument(..., help="A scan (JPEG or DICOM folder, NIfTI file) or a cached tensor file (.pt)."),
    model: Path = typer.Option(..., "--model", "-m", help="A run folder written by 'cov3d train'."),
    output: Path = typer.Option(Path("explain"), "--output", "-o", help="Folder for <scan>-gradcam.pt and .png."),
    window: Optional[str] = ModelWindowOption,
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
):
    """3D Grad-CAM of the COVID-19 presence prediction (last residual block), shown through its peak."""
    from cov3d.inference.explain import explain as run_explain

    result = run_explain(scan, model, output, cache_dir=cache_dir, device=device, window=window)
    typer.echo(f"P(covid) = {result['probability']:.3f}, peak (z, y, x) = {result['peak']} -> {result['image']}")
