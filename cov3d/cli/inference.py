"""`cov3d infer`, `export` and `explain`: the commands that use a trained model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from cov3d.cli.common import (
    CacheDirOption,
    DeviceOption,
    ModelWindowOption,
    OverwriteOption,
    PrecisionOption,
    app,
    cache_directory,
    parse_window,
    user_errors,
)
from cov3d.errors import Cov3dError
from cov3d.settings import (
    DEFAULT_EXPLAIN_METHOD,
    INFER_BATCH_SIZE,
    INFER_SEED,
    OCCLUSION_GRID,
)
from cov3d.window import MODEL_WINDOW


@app.command("infer")
@user_errors
def infer_command(
    scans: list[Path] = typer.Argument(..., help="Scans (JPEG slice folders, DICOM series folders, NIfTI files) or folders that contain them."),
    model: Optional[list[Path]] = typer.Option(None, "--model", "-m", help="A run folder of 'cov3d train', a file of 'cov3d export', or a folder of them, for both tasks. Repeat for an ensemble (probabilities are averaged)."),
    presence_model: Optional[list[Path]] = typer.Option(None, "--presence-model", help="Like --model, for COVID-19 presence only (its best-presence weights). Repeatable."),
    severity_model: Optional[list[Path]] = typer.Option(None, "--severity-model", help="Like --model, for severity only (its best-severity weights). Repeatable."),
    output: Path = typer.Option(Path("predictions.csv"), "--output", "-o", help="CSV file for the predictions, written row by row."),
    submission_dir: Optional[Path] = typer.Option(None, "--submission-dir", help="Also write the competition files (covid.csv, non-covid.csv, mild.csv, ...)."),
    batch_size: int = typer.Option(INFER_BATCH_SIZE, "--batch-size", help="Scans per forward pass."),
    mc_samples: int = typer.Option(0, "--mc-samples", help="Monte-Carlo dropout samples per model; adds covid_probability_std and severity_agreement columns. 0: off."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows already in --output and predict only the other scans."),
    skip_flagged: bool = typer.Option(False, "--skip-flagged", help="Leave scans with a flag (not-ct, no-lungs, synthetic-model, out-of-distribution) out of the CSV and the submission files, and list them."),
    overwrite: bool = OverwriteOption,
    seed: int = typer.Option(INFER_SEED, "--seed", help="Random seed of the Monte-Carlo dropout samples."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Average each scan with its sagittal reflection (paper) or not (twice as fast)."),
    window: Optional[str] = ModelWindowOption,
    workers: Optional[int] = typer.Option(None, "--workers", help="Background preprocessing processes (0: in the main process). Default: half the CPU cores, at least 1."),
    cache_dir: Optional[Path] = CacheDirOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    uncalibrated: bool = typer.Option(False, "--uncalibrated", help="Report the models' raw probabilities, without the temperatures fitted after training (decisions are the same)."),
):
    """Predict COVID-19 presence and severity for scans (mean over each scan and its reflection, and over models)."""
    from cov3d.dataset.scans import find_scans
    from cov3d.inference.infer import check_inference_options, infer

    if not (model or presence_model or severity_model):
        raise Cov3dError("Give --model (both tasks), or --presence-model and/or --severity-model.")
    check_inference_options(batch_size=batch_size, mc_samples=mc_samples, workers=workers, seed=seed)
    scan_dirs = find_scans(scans)
    summary = infer(
        scan_dirs, model or [], output, presence_models=presence_model or [], severity_models=severity_model or [],
        cache_dir=cache_directory(cache_dir), device=device,
        precision=precision, batch_size=batch_size, submission_dir=submission_dir, mc_samples=mc_samples,
        workers=workers, resume=resume, seed=seed, reflect=tta, overwrite=overwrite,
        window=parse_window(window, MODEL_WINDOW), calibrated=not uncalibrated, skip_flagged=skip_flagged,
    )
    for path, reason in summary.failed:
        typer.secho(f"Failed {path}: {reason}", fg=typer.colors.RED, err=True)
    if skip_flagged:
        for path, flags in summary.flagged:
            typer.secho(f"Left out {path}: {'; '.join(f'{code}: {why}' for code, why in flags.items())}",
                        fg=typer.colors.YELLOW, err=True)
    if summary.flagged_line:
        typer.secho(summary.flagged_line + " (docs/inference.md#flags)", fg=typer.colors.YELLOW, err=True)
    kept = f", {summary.resumed} already in the CSV" if summary.resumed else ""
    left_out = f", {len(summary.flagged)} of them flagged and left out of the CSV" if skip_flagged and summary.flagged else ""
    typer.echo(f"{summary.predicted} scans predicted ({summary.covid} with COVID-19){left_out}{kept} -> {output}")
    typer.echo(summary.calibration, err=True)
    if summary.failed:
        raise typer.Exit(1)


@app.command("export")
@user_errors
def export_command(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'cov3d train' (or a model file to re-export)."),
    out: Path = typer.Argument(..., help="The model file to write (.safetensors), or an existing folder to write it in."),
    overwrite: bool = OverwriteOption,
):
    """Pack a run's config and weights into one safe, shareable model file (safetensors, no pickle)."""
    from cov3d.model.files import export_model

    written = export_model(run_dir, out, overwrite=overwrite)
    typer.echo(f"Model written to {written} ({written.stat().st_size / 2**20:.1f} MiB).")

@app.command("explain")
@user_errors
def explain_command(
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
    from cov3d.inference.explain import explain

    result = explain(scan, model, output, cache_dir=cache_dir, device=device, precision=precision,
                     overwrite=overwrite, window=parse_window(window, MODEL_WINDOW), method=method)
    typer.echo(f"P(covid) = {result['probability']:.3f}, peak (z, y, x) = {result['peak']} -> {result['image']}")
    for code, reason in result["flags"].items():
        typer.secho(f"Flagged {code}: {reason} (docs/inference.md#flags)", fg=typer.colors.YELLOW, err=True)
