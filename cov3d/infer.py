"""Inference: trained runs -> probabilities per scan, with reflection test-time augmentation (paper §3.5)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from rich.progress import Progress
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import Cov3dError
from .model import build_model
from .preprocess import VolumeCache
from .runtime import autocast, resolve_device, resolve_precision
from .scans import scan_number
from .train import CHECKPOINTS, CONFIG_FILE

CSV_COLUMNS = (
    "name", "path", "covid_probability", "covid", "severity",
    "mild_probability", "moderate_probability", "severe_probability", "critical_probability",
)
SEVERITY_LABELS = ("mild", "moderate", "severe", "critical")
PRESENCE_THRESHOLD = 0.5
SUBMISSION_FILES = {"covid": "covid.csv", "non-covid": "non-covid.csv", **{s: f"{s}.csv" for s in SEVERITY_LABELS}}


@dataclass
class Prediction:
    """Probabilities for one scan: P(covid) and P(severity | covid) over mild..critical (or None)."""

    covid_probability: float
    severity_probabilities: list[float] | None

    @property
    def covid(self) -> bool:
        return self.covid_probability >= PRESENCE_THRESHOLD

    @property
    def severity(self) -> str:
        if self.severity_probabilities is None:
            return ""
        return SEVERITY_LABELS[max(range(4), key=self.severity_probabilities.__getitem__)]


def read_config(run_dir: Path) -> dict:
    """The run's config.json, with a clear error when `run_dir` is not a cov3d run."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise Cov3dError(f"{run_dir} is not a cov3d run: {CONFIG_FILE} is missing. Give the --output-dir of 'cov3d train'.")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise Cov3dError(f"{config_path} is not valid JSON ({error}); re-create the run or restore the file.") from error


def load_weights(model: torch.nn.Module, weights_path: Path) -> torch.nn.Module:
    """Load safetensors weights into `model` (never unpickles anything) and set eval mode."""
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as error:
        reason = str(error).splitlines()[0]
        raise Cov3dError(f"Cannot load weights {weights_path}: {reason}. Re-export the run with cov3d.") from error
    return model.eval()


class RunPredictor:
    """The models of one training run: presence from the best-presence weights, severity from the best-severity ones."""

    def __init__(self, run_dir: Path, device: torch.device, dtype: torch.dtype | None):
        self.run_dir, self.device, self.dtype = Path(run_dir), device, dtype
        self.config = read_config(self.run_dir)
        self.size = (self.config["depth"], self.config["height"], self.config["width"])
        self.fast_decode = bool(self.config.get("fast_decode", False))
        self.presence_model = self._load("presence_f1")
        self.severity_model = self._load("severity_f1")
        if self.presence_model is None and self.severity_model is None:
            raise Cov3dError(f"{self.run_dir} holds no weights ({', '.join(CHECKPOINTS.values())}); train it first.")

    def _load(self, monitored: str) -> torch.nn.Module | None:
        path = self.run_dir / CHECKPOINTS[monitored]
        if not path.is_file():
            return None
        model = build_model(
            outputs=self.config["outputs"], penultimate=self.config["penultimate"],
            dropout=self.config["dropout"], pool=self.config["pool"],
        )
        return load_weights(model, path).to(self.device)

    def _probabilities(self, model: torch.nn.Module, volumes: torch.Tensor) -> torch.Tensor:
        """Mean over the scan and its sagittal reflection of [sigmoid(x), softmax(z)] -> (B, 1 or 6)."""
        outputs = []
        for view in (volumes, volumes.flip(-1)):
            with torch.no_grad(), autocast(self.device, self.dtype):
                logits = model(view).float()
            parts = [torch.sigmoid(logits[:, :1])]
            if logits.shape[1] > 1:
                parts.append(torch.softmax(logits[:, 1:], dim=1))
            outputs.append(torch.cat(parts, dim=1))
        return torch.stack(outputs).mean(dim=0)

    def predict(self, volumes: torch.Tensor) -> list[Prediction]:
        """Volumes (B, 1, D, H, W) -> one Prediction per scan."""
        volumes = volumes.to(self.device)
        presence = self._probabilities(self.presence_model, volumes) if self.presence_model else None
        severity = self._probabilities(self.severity_model, volumes) if self.severity_model else None
        if presence is not None:
            covid = presence[:, 0]
        else:  # lambda = 1 runs: P(covid) = sum of the four severity classes (paper, after eq. 3)
            covid = severity[:, 2:6].sum(dim=1)
        severity_given_covid = None
        if severity is not None:
            severity_given_covid = severity[:, 2:6] / severity[:, 2:6].sum(dim=1, keepdim=True)
        return [
            Prediction(
                float(covid[i]),
                severity_given_covid[i].tolist() if severity_given_covid is not None else None,
            )
            for i in range(volumes.shape[0])
        ]


def prediction_row(scan_dir: Path, prediction: Prediction) -> dict[str, str]:
    """A CSV row (see CSV_COLUMNS) for one scan."""
    severity = prediction.severity_probabilities or [None] * 4
    row = {
        "name": scan_dir.name,
        "path": str(scan_dir),
        "covid_probability": f"{prediction.covid_probability:.6f}",
        "covid": str(int(prediction.covid)),
        "severity": prediction.severity,
    }
    for label, probability in zip(SEVERITY_LABELS, severity):
        row[f"{label}_probability"] = "" if probability is None else f"{probability:.6f}"
    return row


def batches(scan_dirs: Sequence[Path], cache: VolumeCache, batch_size: int) -> Iterator[tuple[list[Path], torch.Tensor | None, list[tuple[Path, str]]]]:
    """Yield (scans, volumes (B, 1, D, H, W) or None, failures) in groups of `batch_size`."""
    for start in range(0, len(scan_dirs), batch_size):
        loaded, volumes, failures = [], [], []
        for scan_dir in scan_dirs[start:start + batch_size]:
            try:
                volumes.append(cache.get(scan_dir))
                loaded.append(scan_dir)
            except Cov3dError as error:
                failures.append((scan_dir, str(error)))
        yield loaded, torch.stack(volumes) if volumes else None, failures


def write_submission(rows: list[dict[str, str]], submission_dir: Path) -> None:
    """Competition files: one scan name per line, no header, sorted by the number in the name."""
    submission_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {label: [] for label in SUBMISSION_FILES}
    for row in rows:
        groups["covid" if row["covid"] == "1" else "non-covid"].append(row["name"])
        if row["severity"]:
            groups[row["severity"]].append(row["name"])
    for label, names in groups.items():
        if label in SEVERITY_LABELS and not any(row["severity"] for row in rows):
            continue
        ordered = sorted(names, key=lambda name: (scan_number(name), name))
        (submission_dir / SUBMISSION_FILES[label]).write_text("".join(f"{name}\n" for name in ordered))


def infer(
    scan_dirs: Sequence[Path],
    run_dir: Path,
    output: Path,
    *,
    cache_dir: Path,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 2,
    submission_dir: Path | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, str]], list[tuple[Path, str]]]:
    """Predict every scan, write the CSV (rows as they come) and optional submission files.

    Returns the rows written and the scans that failed (path, reason).
    """
    torch_device = resolve_device(device)
    predictor = RunPredictor(run_dir, torch_device, resolve_precision(precision, torch_device))
    depth, height, width = predictor.size
    cache = VolumeCache(cache_dir, depth, height, width, fast_decode=predictor.fast_decode)
    rows, failed = [], []
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle, Progress(disable=not progress) as bar:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        task = bar.add_task("Predicting", total=len(scan_dirs))
        for loaded, volumes, failures in batches(scan_dirs, cache, batch_size):
            failed += failures
            if volumes is not None:
                for scan_dir, prediction in zip(loaded, predictor.predict(volumes)):
                    row = prediction_row(scan_dir, prediction)
                    writer.writerow(row)
                    rows.append(row)
                handle.flush()
            bar.advance(task, len(loaded) + len(failures))
    if submission_dir is not None:
        write_submission(rows, submission_dir)
    return rows, failed
