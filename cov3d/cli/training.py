"""`cov3d train` and `cov3d demo`: the commands that train a model."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from cov3d.cli.common import (
    DEMO_DEFAULTS,
    WARP_HELP,
    CacheDirOption,
    DepthOption,
    DeviceOption,
    FastDecodeOption,
    HeightOption,
    PrecisionOption,
    WarpOption,
    WidthOption,
    WindowHelp,
    WorkersOption,
    app,
    cache_directory,
    parse_window,
    size_option,
    user_errors,
)
from cov3d.demo_settings import DEMO_WORKLOADS_HELP, DemoSettings
from cov3d.errors import BaselineNotBeaten, Cov3dError
from cov3d.limits import command_parameter
from cov3d.recipes import ORIGINAL, ORIGINAL_DEFAULTS, PAPER, RECIPE_HELP, RECIPE_WARPS, recipe_warp
from cov3d.settings import (
    DETERMINISTIC,
    RESUMABLE,
    TRAIN_DEFAULTS,
    TrainSettings,
    VolumeShape,
)
from cov3d.window import DEFAULT_WINDOW


def recipe_help(text: str, name: str) -> str:
    """An option's help with its default under each recipe (``cov3d.recipes``)."""
    paper = getattr(TRAIN_DEFAULTS, name)
    original = ORIGINAL_DEFAULTS.get(name, paper)
    return f"{text} Default: {paper}; --recipe {ORIGINAL}: {original}."


@app.command("train")
@user_errors
def train_command(
    ctx: typer.Context,
    directory: Optional[Path] = typer.Option(None, "--directory", "-d", help="Dataset folder with train/, validation/ and the two severity CSVs."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder for weights, config and metrics. Default: outputs/run-<time>."),
    size: Optional[str] = size_option("small"),
    depth: Optional[int] = DepthOption,
    width: Optional[int] = WidthOption,
    height: Optional[int] = HeightOption,
    fast_decode: bool = FastDecodeOption,
    recipe: str = typer.Option(PAPER, "--recipe", help=RECIPE_HELP),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=recipe_help("Epochs of the 1cycle schedule (paper: 30, 40 or 50).", "epochs")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=recipe_help("Scans per batch (paper: 2).", "batch_size")),
    learning_rate: float = typer.Option(TRAIN_DEFAULTS.learning_rate, "--learning-rate", help="Maximum learning rate of 1cycle (paper: 1e-4)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=recipe_help("Adam weight decay (paper: 1e-5).", "weight_decay")),
    pct_start: float = typer.Option(TRAIN_DEFAULTS.pct_start, "--pct-start", help="Share of the 1cycle schedule spent raising the learning rate."),
    div_factor: float = typer.Option(TRAIN_DEFAULTS.div_factor, "--div-factor", help="1cycle starts at --learning-rate divided by this."),
    final_div_factor: float = typer.Option(TRAIN_DEFAULTS.final_div_factor, "--final-div-factor", help="1cycle ends at --learning-rate divided by this."),
    momentums: tuple[float, float, float] = typer.Option(TRAIN_DEFAULTS.momentums, "--momentums", help="Adam's beta1 at the start, the peak and the end of 1cycle (three numbers)."),
    severity_factor: float = typer.Option(TRAIN_DEFAULTS.severity_factor, "--severity-factor", help="lambda in eq. 6: 0 trains presence only, 1 severity only."),
    presence_smoothing: float = typer.Option(TRAIN_DEFAULTS.presence_smoothing, "--presence-smoothing", help="Label smoothing eps_p for presence (paper: 0 or 0.1)."),
    severity_smoothing: Optional[float] = typer.Option(None, "--severity-smoothing", help=recipe_help(
        "Label smoothing eps_s for severity, shared by neighbouring classes (paper: 0 or 0.1; none with --severity-loss graded-only).", "severity_smoothing")),
    severity_loss: Optional[str] = typer.Option(None, "--severity-loss", help=recipe_help(
        "every-scan (eqs. 3-5: 1 + 5 outputs, negatives and ungraded positives included, weighted) or graded-only "
        "(the original code's 4-way unweighted cross entropy over graded scans: 1 + 4 outputs).", "severity_loss")),
    presence_weighting: Optional[str] = typer.Option(None, "--presence-weighting", help=recipe_help(
        "item-weights (eq. 2's class-balancing w_i) or pos-weight (the original code's BCE pos_weight = non-covid / "
        "covid training scans, on the y log p term only).", "presence_weighting")),
    penultimate: int = typer.Option(TRAIN_DEFAULTS.penultimate, "--penultimate", help="Size of the head's hidden layer."),
    dropout: float = typer.Option(TRAIN_DEFAULTS.dropout, "--dropout", help="Dropout after each ResNet layer and in the head."),
    pool: str = typer.Option(TRAIN_DEFAULTS.pool, "--pool", help="Global pooling before the head: max (the original code) or avg (torchvision's)."),
    final_bias: bool = typer.Option(TRAIN_DEFAULTS.final_bias, "--final-bias/--no-final-bias", help="A bias in the last linear layer (the original code had none)."),
    presence_averaging: str = typer.Option(TRAIN_DEFAULTS.presence_averaging, "--presence-averaging", help=(
        "How the weighted presence terms of a batch are averaged: batch (1/B sum w l, the original code) or "
        "weighted (sum w l / sum w). Severity terms are always averaged over their weights.")),
    warp: Optional[float] = typer.Option(None, "--warp", help=f"{WARP_HELP} Default: {RECIPE_WARPS[PAPER]}; --recipe original: {RECIPE_WARPS[ORIGINAL]}."),
    reflect: Optional[bool] = typer.Option(None, "--reflect/--no-reflect", help=recipe_help("Random sagittal reflection in training.", "reflect")),
    validation_reflection: Optional[bool] = typer.Option(None, "--validation-reflection/--no-validation-reflection", help=recipe_help(
        "With --reflect, reflect validation scans at random too (the original code).", "validation_reflection")),
    presence_decision: Optional[str] = typer.Option(None, "--presence-decision", help=recipe_help(
        "P(covid) of a scan and its reflection: mean-probability (paper) or mean-logit (sigmoid of the mean logit, the "
        "original code). Recorded in the run; inference uses it.", "presence_decision")),
    kept_weights: Optional[str] = typer.Option(None, "--kept-weights", help=recipe_help(
        "per-task (the best weights of each task, paper) or one (one checkpoint, the best presence F1, or severity F1 "
        "when lambda = 1, predicting both tasks: the original code).", "kept_weights")),
    optimizer: str = typer.Option(TRAIN_DEFAULTS.optimizer, "--optimizer", help=(
        "How Adam is computed: fused-adamw (torch's fused kernel) or fastai-adam (the original code's fastai "
        "implementation: the same steps, about ten operations per parameter per step).")),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Start from Kinetics-400 weights (paper) or from scratch."),
    pretrained_weights: Optional[Path] = typer.Option(None, "--pretrained-weights", help="A torchvision r3d_18 Kinetics-400 state-dict file."),
    seed: int = typer.Option(TRAIN_DEFAULTS.seed, "--seed", help="Random seed: runs with the same seed on a CPU give identical metrics."),
    cache_dir: Optional[Path] = CacheDirOption,
    workers: Optional[int] = WorkersOption,
    loader_workers: Optional[int] = typer.Option(None, "--loader-workers", help="Batch-loading processes per training process. Default: 0 on CPU, up to 4 per GPU."),
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    wandb: bool = typer.Option(False, "--wandb", help="Log to Weights & Biases (WANDB_MODE=offline works)."),
    deterministic: bool = typer.Option(DETERMINISTIC, "--deterministic/--no-deterministic", help=(
        "Deterministic kernels: the same seed gives the same run (on GPUs: no cuDNN autotuning, deterministic "
        "algorithms only). --no-deterministic: cuDNN autotuning and the fastest kernels; runs differ slightly. "
        "See docs/gpu.md for what each costs.")),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the killed run in this folder from its last epoch (or, killed after it, from the evaluation after training), as it was started: data, settings, cache folder, device and precision come from its config.json; --directory, --cache-dir, --device, --precision and the worker options may be given again to override them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --output-dir (its files are removed first)."),
    window: Optional[str] = typer.Option(None, "--window", help=WindowHelp.format(
        default="the mapping calibrated to COV19-CT-DB") + " Recorded in the run; inference uses it."),
):
    """Train the Cov3d model (r3d_18, combined loss, Adam with 1cycle) and keep the best weights for each task."""
    from cov3d.training.train import resume_training, train

    if resume is not None:
        result = resume_training(resume, **resume_overrides(ctx))
        typer.echo(f"Run written to {result.run_dir} (best: {format_scores(result.best_scores)}).")
        return
    if directory is None:
        raise Cov3dError("Give --directory DATA (or --resume RUN_DIR to continue a run).")
    if pretrained_weights is not None and not pretrained_weights.is_file():
        raise Cov3dError(f"--pretrained-weights {pretrained_weights}: no such file.")
    shape = VolumeShape.from_options(size, depth, height, width, fast_decode=fast_decode, warp=recipe_warp(recipe, warp),
                                     window=parse_window(window, DEFAULT_WINDOW))
    recipe_options = {
        "epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay, "severity_smoothing": severity_smoothing,
        "severity_loss": severity_loss, "presence_weighting": presence_weighting, "reflect": reflect,
        "validation_reflection": validation_reflection, "presence_decision": presence_decision, "kept_weights": kept_weights,
    }
    settings = TrainSettings.for_recipe(
        recipe, shape=shape, learning_rate=learning_rate, pct_start=pct_start, div_factor=div_factor,
        final_div_factor=final_div_factor, momentums=momentums, severity_factor=severity_factor,
        presence_smoothing=presence_smoothing, penultimate=penultimate, dropout=dropout, pool=pool, final_bias=final_bias,
        presence_averaging=presence_averaging, seed=seed, optimizer=optimizer,
        **{name: value for name, value in recipe_options.items() if value is not None},
    )
    run_dir = output_dir or Path("outputs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    result = train(
        directory, run_dir, settings, cache_dir=cache_directory(cache_dir),
        pretrained_weights=pretrained_weights, pretrained=pretrained, device=device,
        precision=precision, workers=workers, loader_workers=loader_workers, use_wandb=wandb, overwrite=overwrite,
        deterministic=deterministic,
    )
    typer.echo(f"Run written to {result.run_dir} (best: {format_scores(result.best_scores)}).")


RESUME_OVERRIDES = {command_parameter(name): name for name in RESUMABLE}
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

@app.command("demo")
@user_errors
def demo_command(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Folder for the dataset, cache, run and predictions."),
    scans: Optional[int] = typer.Option(None, "--scans", help="Synthetic scans to generate. Default: the workload's (below)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs. Default: the workload's (below)."),
    seed: int = typer.Option(DEMO_DEFAULTS.seed, "--seed", help="Random seed for the data and the training."),
    size: Optional[str] = size_option(
        f"the demo's own workload, from the precision in use: {DEMO_WORKLOADS_HELP} (under 10 minutes on 2 CPU cores)"),
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
    from cov3d.workflows.demo import run_demo

    if (size, depth, height, width) == (None, None, None, None):  # the workload of the precision in use
        settings = DemoSettings(scans=scans, epochs=epochs, seed=seed, fast_decode=fast_decode, warp=warp)
    else:
        shape = VolumeShape.from_options(size, depth, height, width, fast_decode=fast_decode, warp=warp)
        settings = DemoSettings(scans=scans, epochs=epochs, seed=seed, depth=shape.depth, height=shape.height,
                                width=shape.width, fast_decode=shape.fast_decode, warp=shape.warp)
    try:
        report = run_demo(output, settings, workers=workers, device=device, precision=precision)
    except BaselineNotBeaten as error:
        print_demo_report(error.report)
        raise
    print_demo_report(report)


def print_demo_report(report) -> None:
    """The demo's score table (macro F1 per task and split), the time of each step, where its files are,
    and that its model knows only phantoms."""
    from rich.console import Console
    from rich.table import Table

    from cov3d.dataset.domain import FLAG_SYNTHETIC_MODEL

    table = Table(title="Macro F1 on the synthetic data")
    table.add_column("model / split")
    table.add_column("presence", justify="right")
    table.add_column("severity", justify="right")
    for name, scores in report.scores.items():
        table.add_row(name, *(f"{scores[task]:.3f}" if math.isfinite(scores[task]) else "none" for task in ("presence_f1", "severity_f1")))
    console = Console()
    console.print(table)
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.seconds.items())
    console.print(f"Time: {steps}; total {sum(report.seconds.values()):.0f} s")
    for label, path in (("Run", report.run_dir), ("Test predictions", report.predictions)):
        console.print(f"{label}: {path}", soft_wrap=True, markup=False, highlight=False)  # whole, to copy
    console.print(f"The model learned synthetic phantoms: its predictions carry the {FLAG_SYNTHETIC_MODEL} flag and "
                  "say nothing about real scans (train on real chest CTs with `cov3d train` for that).")
