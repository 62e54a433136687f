"""The `cov3d` command line: parses options, calls the library, turns user mistakes into one-line errors."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from cov3d.errors import BaselineNotBeaten, Cov3dError
from cov3d.settings import (
    DEFAULT_EXPLAIN_METHOD,
    DEMO_SHAPE,
    INFER_BATCH_SIZE,
    INFER_SEED,
    OCCLUSION_GRID,
    ORIGINAL_WARP,
    PRESET_NAMES,
    SMALL,
    DemoSettings,
    TrainSettings,
    VolumeShape,
)

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


TRAIN_DEFAULTS, DEMO_DEFAULTS = TrainSettings(), DemoSettings()
"""The library's defaults, which the options below show and pass on."""
CacheDirOption = typer.Option(None, "--cache-dir", help="Where preprocessed tensors are kept. Default: $COV3D_CACHE_DIR or ~/.cache/cov3d.")
WorkersOption = typer.Option(None, "--workers", help="Parallel preprocessing processes. Default: all CPU cores.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda.")
WarpOption = typer.Option(TRAIN_DEFAULTS.warp, "--warp", help=(
    "Cubic coordinate warp factor f (u -> f u^3 + (1 - f) u along width, height and depth) that the original code "
    f"applied by default with {ORIGINAL_WARP}; not in the paper. 0: off; 0 <= f < 1. Warped volumes are cached under their own key."))
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
OverwriteOption = typer.Option(False, "--overwrite", help="Replace existing files that are not cov3d's earlier outputs of the same kind (never an input).")


def fail(message: str) -> None:
    """Print a one-line error and exit with status 1."""
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


SETTING = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]*))?`")
"""A setting named in a library message: `name` or `name=value` (``cov3d.errors``)."""
OPTION_ALIASES = {"data_dir": "directory", "use_wandb": "wandb", "output_dir": "output", "reflect": "tta", "models": "model"}
"""Library names of settings whose option is spelt otherwise, where the command has no option of the name itself."""


def spellings(command: Callable) -> dict[str, tuple[str, str]]:
    """Parameter name -> (option, its negative or the option again) of a command function;
    an argument is spelt as its metavar (``OUTPUT``)."""
    spelt = {}
    for name, parameter in inspect.signature(command).parameters.items():
        info = parameter.default
        if isinstance(info, typer.models.ArgumentInfo):
            spelt[name] = (name.upper(), name.upper())
        elif isinstance(info, typer.models.OptionInfo):
            flag = next(declared for declared in info.param_decls if declared.startswith("--"))
            positive, _, negative = flag.partition("/")
            spelt[name] = (positive, negative or positive)
    return spelt


def phrase(message: str, command: Callable) -> str:
    """A library message with the settings it names spelt as ``command``'s options:
    `learning_rate` -> --learning-rate, `precision=fp32` -> --precision fp32, `pretrained=False`
    -> --no-pretrained. A setting the command has no option for keeps its Python name."""
    options = spellings(command)

    def spelt(match: re.Match) -> str:
        name, value = match.groups()
        option = options.get(name) or options.get(OPTION_ALIASES.get(name, ""))
        if option is None:
            return match.group(0).strip("`")
        if value == "False":
            return option[1]
        return option[0] if value in (None, "True") else f"{option[0]} {value.strip(chr(34) + chr(39))}"

    return SETTING.sub(spelt, message)


def user_errors(command: Callable) -> Callable:
    """Show Cov3dError (its settings spelt as this command's options), and any OSError (a folder
    that cannot be made, a full disk), as a single line (no traceback) and exit non-zero."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Cov3dError as error:
            fail(phrase(str(error), command))
        except OSError as error:
            from cov3d.errors import one_line

            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{one_line(error.strerror or error)}. Check the path, its permissions and the free disk space.")

    return wrapper


def size_option(default: str) -> typer.Option:
    return typer.Option(None, "--size", help=f"{PRESET_NAMES}. Default: {default}, or what --depth/--height/--width give.")


DepthOption = typer.Option(None, "--depth", help="Slices per scan after interpolation. Default: width / 2 (paper: 64, 128 or 160).")
HeightOption = typer.Option(None, "--height", help="Slice height in pixels. Default: the width.")
WidthOption = typer.Option(None, "--width", help=f"Slice width in pixels. Default: {SMALL.width} (paper: 128, 256 or 320).")
FastDecodeOption = typer.Option(False, "--fast-decode", help="Decode JPEGs at reduced scale (faster, slightly different values; cached apart).")


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

    shape = VolumeShape.from_options(size, depth, height, width, fast_decode=fast_decode, warp=warp, window=window)
    WORKERS.check("workers", workers)
    cache = VolumeCache.for_shape(cache_directory(cache_dir), shape)
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
def prune_cache(
    cache_dir: Optional[Path] = CacheDirOption,
    missing_scans: bool = typer.Option(False, "--missing-scans", help="Also remove entries whose scan folder or file no longer exists (not while a data drive is unmounted)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
):
    """Free the cache of entries that can never be read again: older format versions, damaged entries, leftovers of killed writers (only files that prove to be entries)."""
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
    ctx: typer.Context,
    directory: Optional[Path] = typer.Option(None, "--directory", "-d", help="Dataset folder with train/, validation/ and the two severity CSVs."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder for weights, config and metrics. Default: outputs/run-<time>."),
    size: Optional[str] = size_option("small"),
    depth: Optional[int] = DepthOption,
    width: Optional[int] = WidthOption,
    height: Optional[int] = HeightOption,
    fast_decode: bool = FastDecodeOption,
    epochs: int = typer.Option(TRAIN_DEFAULTS.epochs, "--epochs", help="Epochs of the 1cycle schedule (paper: 30, 40 or 50)."),
    batch_size: int = typer.Option(TRAIN_DEFAULTS.batch_size, "--batch-size", help="Scans per batch (paper: 2)."),
    learning_rate: float = typer.Option(TRAIN_DEFAULTS.learning_rate, "--learning-rate", help="Maximum learning rate of 1cycle (paper: 1e-4)."),
    weight_decay: float = typer.Option(TRAIN_DEFAULTS.weight_decay, "--weight-decay", help="Adam weight decay (paper: 1e-5)."),
    severity_factor: float = typer.Option(TRAIN_DEFAULTS.severity_factor, "--severity-factor", help="lambda in eq. 6: 0 trains presence only, 1 severity only."),
    presence_smoothing: float = typer.Option(TRAIN_DEFAULTS.presence_smoothing, "--presence-smoothing", help="Label smoothing eps_p for presence (paper: 0 or 0.1)."),
    severity_smoothing: float = typer.Option(TRAIN_DEFAULTS.severity_smoothing, "--severity-smoothing", help="Label smoothing eps_s for severity, shared by neighbouring classes (paper: 0 or 0.1)."),
    penultimate: int = typer.Option(TRAIN_DEFAULTS.penultimate, "--penultimate", help="Size of the head's hidden layer."),
    dropout: float = typer.Option(TRAIN_DEFAULTS.dropout, "--dropout", help="Dropout after each ResNet layer and in the head."),
    pool: str = typer.Option(TRAIN_DEFAULTS.pool, "--pool", help="Global pooling before the head: max (the original code) or avg (torchvision's)."),
    final_bias: bool = typer.Option(TRAIN_DEFAULTS.final_bias, "--final-bias/--no-final-bias", help="A bias in the last linear layer (the original code had none)."),
    presence_averaging: str = typer.Option(TRAIN_DEFAULTS.presence_averaging, "--presence-averaging", help=(
        "How the weighted presence terms of a batch are averaged: batch (1/B sum w l, the original code) or "
        "weighted (sum w l / sum w). Severity terms are always averaged over their weights.")),
    warp: float = WarpOption,
    reflect: bool = typer.Option(TRAIN_DEFAULTS.reflect, "--reflect/--no-reflect", help="Random sagittal reflection in training."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Start from Kinetics-400 weights (paper) or from scratch."),
    pretrained_weights: Optional[Path] = typer.Option(None, "--pretrained-weights", help="A torchvision r3d_18 Kinetics-400 state-dict file."),
    seed: int = typer.Option(TRAIN_DEFAULTS.seed, "--seed", help="Random seed: runs with the same seed on a CPU give identical metrics."),
    cache_dir: Optional[Path] = CacheDirOption,
    workers: Optional[int] = WorkersOption,
    loader_workers: Optional[int] = typer.Option(None, "--loader-workers", help="Batch-loading processes per training process. Default: 0 on CPU, up to 4 per GPU."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    wandb: bool = typer.Option(False, "--wandb", help="Log to Weights & Biases (WANDB_MODE=offline works)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the killed run in this folder from its last epoch, as it was started: data, settings, cache folder, device and precision come from its config.json; --directory, --cache-dir, --device, --precision and the worker options may be given again to override them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --output-dir (its files are removed first)."),
    window: Optional[str] = typer.Option(None, "--window", help=WindowHelp.format(
        default="the mapping calibrated to COV19-CT-DB") + " Recorded in the run; inference uses it."),
):
    """Train the Cov3d model (r3d_18, combined loss, Adam with 1cycle) and keep the best weights for each task."""
    from cov3d.training.train import resume_training, train as run_training

    if resume is not None:
        result = resume_training(resume, **resume_overrides(ctx))
        typer.echo(f"Run written to {result.run_dir} (best: {format_scores(result.best_scores)}).")
        return
    if directory is None:
        raise Cov3dError("Give --directory DATA (or --resume RUN_DIR to continue a run).")
    if pretrained_weights is not None and not pretrained_weights.is_file():
        raise Cov3dError(f"--pretrained-weights {pretrained_weights}: no such file.")
    shape = VolumeShape.from_options(size, depth, height, width, fast_decode=fast_decode, warp=warp, window=window)
    settings = TrainSettings(
        depth=shape.depth, height=shape.height, width=shape.width, fast_decode=shape.fast_decode, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, weight_decay=weight_decay, severity_factor=severity_factor,
        presence_smoothing=presence_smoothing, severity_smoothing=severity_smoothing,
        penultimate=penultimate, dropout=dropout, pool=pool, final_bias=final_bias,
        presence_averaging=presence_averaging, reflect=reflect, warp=shape.warp, window=str(shape.window), seed=seed,
    )
    run_dir = output_dir or Path("outputs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    result = run_training(
        directory, run_dir, settings, cache_dir=cache_directory(cache_dir),
        pretrained_weights=pretrained_weights, pretrained=pretrained, device=device,
        precision=precision, workers=workers, loader_workers=loader_workers, use_wandb=wandb, overwrite=overwrite,
    )
    typer.echo(f"Run written to {result.run_dir} (best: {format_scores(result.best_scores)}).")


RESUME_OVERRIDES = {
    "directory": "data_dir", "cache_dir": "cache_dir", "device": "device", "precision": "precision",
    "workers": "workers", "loader_workers": "loader_workers", "wandb": "use_wandb",
}
"""Options of 'train' that may be given again with --resume (the run's other settings cannot change),
and the keyword argument of ``cov3d.training.train.train`` each becomes."""


def given_by_user(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` was given (on the command line or in its environment variable),
    not left at its default. (Compared by name: typer may bring its own copy of click's enum.)"""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def resume_overrides(ctx: typer.Context) -> dict[str, object]:
    """The runtime options given on the command line with --resume; one-line error for any other."""
    given = [name for name in ctx.params if name != "resume" and given_by_user(ctx, name)]
    for name in given:
        if name not in RESUME_OVERRIDES:
            option = next(param.opts[0] for param in ctx.command.params if param.name == name)
            raise Cov3dError(
                f"{option} cannot change when resuming: --resume {ctx.params['resume']} continues the run with the settings "
                "in its config.json. Start a new run to change it."
            )
    return {RESUME_OVERRIDES[name]: ctx.params[name] for name in given}


def format_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" if math.isfinite(value) else f"{name} none" for name, value in scores.items())


@app.command()
@user_errors
def infer(
    scans: list[Path] = typer.Argument(..., help="Scans (JPEG slice folders, DICOM series folders, NIfTI files) or folders that contain them."),
    model: Optional[list[Path]] = typer.Option(None, "--model", "-m", help="A run folder of 'cov3d train', a file of 'cov3d export', or a folder of them, for both tasks. Repeat for an ensemble (probabilities are averaged)."),
    presence_model: Optional[list[Path]] = typer.Option(None, "--presence-model", help="Like --model, for COVID-19 presence only (its best-presence weights). Repeatable."),
    severity_model: Optional[list[Path]] = typer.Option(None, "--severity-model", help="Like --model, for severity only (its best-severity weights). Repeatable."),
    output: Path = typer.Option(Path("predictions.csv"), "--output", "-o", help="CSV file for the predictions, written row by row."),
    submission_dir: Optional[Path] = typer.Option(None, "--submission-dir", help="Also write the competition files (covid.csv, non-covid.csv, mild.csv, ...)."),
    batch_size: int = typer.Option(INFER_BATCH_SIZE, "--batch-size", help="Scans per forward pass."),
    mc_samples: int = typer.Option(0, "--mc-samples", help="Monte-Carlo dropout samples per model; adds covid_probability_std and severity_agreement columns. 0: off."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows already in --output and predict only the other scans."),
    overwrite: bool = OverwriteOption,
    seed: int = typer.Option(INFER_SEED, "--seed", help="Random seed of the Monte-Carlo dropout samples."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Average each scan with its sagittal reflection (paper) or not (twice as fast)."),
    window: Optional[str] = ModelWindowOption,
    workers: Optional[int] = typer.Option(None, "--workers", help="Background preprocessing processes (0: in the main process). Default: half the CPU cores, at least 1."),
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
):
    """Predict COVID-19 presence and severity for scans (mean over each scan and its reflection, and over models)."""
    from cov3d.dataset.scans import find_scans
    from cov3d.inference.infer import check_inference_options, infer as run_inference

    if not (model or presence_model or severity_model):
        raise Cov3dError("Give --model (both tasks), or --presence-model and/or --severity-model.")
    check_inference_options(batch_size=batch_size, mc_samples=mc_samples, workers=workers, seed=seed)
    scan_dirs = find_scans(scans)
    summary = run_inference(
        scan_dirs, model or [], output, presence_models=presence_model or [], severity_models=severity_model or [],
        cache_dir=cache_directory(cache_dir), device=device,
        precision=precision, batch_size=batch_size, submission_dir=submission_dir, mc_samples=mc_samples,
        workers=workers, resume=resume, seed=seed, reflect=tta, overwrite=overwrite,
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
    overwrite: bool = OverwriteOption,
):
    """Pack a run's config and weights into one safe, shareable model file (safetensors, no pickle)."""
    from cov3d.model.files import export_model

    written = export_model(run_dir, out, overwrite=overwrite)
    typer.echo(f"Model written to {written} ({written.stat().st_size / 2**20:.1f} MiB).")


@app.command()
@user_errors
def synthetic(
    output: Path = typer.Argument(..., help="Folder to write the dataset to (must not hold a dataset already)."),
    scans: int = typer.Option(120, "--scans", help="Number of scans, all splits together."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same files."),
    slice_size: int = typer.Option(128, "--slice-size", help="Slice width and height in pixels (real data: 512)."),
    depth_scale: float = typer.Option(0.1, "--depth-scale", help="Scale of the slice-count distribution (1.0 = like COV19-CT-DB)."),
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
    scans: int = typer.Option(DEMO_DEFAULTS.scans, "--scans", help="Synthetic scans to generate."),
    epochs: int = typer.Option(DEMO_DEFAULTS.epochs, "--epochs", help="Training epochs."),
    seed: int = typer.Option(DEMO_DEFAULTS.seed, "--seed", help="Random seed for the data and the training."),
    size: Optional[str] = size_option(f"{DEMO_SHAPE} (the demo's own, to train in minutes on a CPU)"),
    depth: Optional[int] = DepthOption,
    height: Optional[int] = HeightOption,
    width: Optional[int] = WidthOption,
    fast_decode: bool = FastDecodeOption,
    workers: Optional[int] = WorkersOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    warp: float = WarpOption,
):
    """Run the whole job on a synthetic dataset: generate, preprocess, train, infer, and score against a baseline."""
    from cov3d.synthetic.demo import run_demo

    shape = VolumeShape.from_options(size, depth, height, width, fast_decode=fast_decode, warp=warp, default=DEMO_SHAPE)
    settings = DemoSettings(scans=scans, epochs=epochs, seed=seed, depth=shape.depth, height=shape.height,
                            width=shape.width, fast_decode=shape.fast_decode, warp=shape.warp)
    try:
        report = run_demo(output, settings, workers=workers, device=device, precision=precision)
    except BaselineNotBeaten as error:
        print_demo_report(error.report)
        raise
    print_demo_report(report)


def print_demo_report(report) -> None:
    """The demo's score table (macro F1 per task and split) and the time of each step."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Macro F1 on the synthetic data")
    table.add_column("model / split")
    table.add_column("presence", justify="right")
    table.add_column("severity", justify="right")
    for name, scores in report.scores.items():
        table.add_row(name, f"{scores['presence_f1']:.3f}", f"{scores['severity_f1']:.3f}")
    console = Console()
    console.print(table)
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.seconds.items())
    console.print(f"Time: {steps}; total {sum(report.seconds.values()):.0f} s")
    console.print(f"Run: {report.run_dir}   Test predictions: {report.predictions}")


@app.command()
@user_errors
def show(
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
                        shape=shape, overwrite=overwrite, window=window)
    typer.echo(f"{len(titles)} scans -> {output}")


@app.command()
@user_errors
def stats(
    data: Path = typer.Argument(..., help="Dataset folder (train/, validation/, test/ and the severity CSVs) or a folder of scans."),
    output: Path = typer.Option(Path("stats"), "--output", "-o", help="Folder for the tables (CSV) and the depth histogram."),
    overwrite: bool = OverwriteOption,
):
    """Count scans, slices, sizes and labels (paper Fig. 1, Tables 1-2) from file names and image headers."""
    from rich.console import Console

    from cov3d.dataset.stats import check_stats_output, dataset_stats, stats_report, write_stats

    result = dataset_stats(data)
    folder = check_stats_output(result, output, overwrite=overwrite)
    console = Console()
    for item in stats_report(result):
        console.print(item)
    write_stats(result, output, folder=folder)
    typer.echo(f"{len(result.scans)} scans, {len(result.warnings)} warnings -> {output}")


@app.command()
@user_errors
def explain(
    scan: Path = typer.Argument(..., help="A scan (JPEG or DICOM folder, NIfTI file) or a cached tensor file (.pt)."),
    model: Path = typer.Option(..., "--model", "-m", help="A run folder written by 'cov3d train'."),
    output: Path = typer.Option(Path("explain"), "--output", "-o", help="Folder for <scan>-<method>.pt and .png."),
    method: str = typer.Option(DEFAULT_EXPLAIN_METHOD, "--method", help=(
        "gradcam: Grad-CAM of the last residual block (one pass). occlusion: how far the presence logit falls "
        f"when each of {math.prod(OCCLUSION_GRID)} blocks in turn is made healthy lung (a pass each, fp32 unless "
        "--precision says otherwise); finer where layer4 is coarse, as at the demo's size.")),
    window: Optional[str] = ModelWindowOption,
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
    overwrite: bool = OverwriteOption,
    precision: str = PrecisionOption,
):
    """Where the model sees COVID-19: a 3D Grad-CAM or occlusion map of the presence prediction, shown through its peak."""
    from cov3d.inference.explain import explain as run_explain

    result = run_explain(scan, model, output, cache_dir=cache_dir, device=device, precision=precision,
                         overwrite=overwrite, window=window, method=method)
    typer.echo(f"P(covid) = {result['probability']:.3f}, peak (z, y, x) = {result['peak']} -> {result['image']}")
