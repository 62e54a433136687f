"""Training: the fastai Learner with Adam, the 1cycle policy, the combined loss and best-F1 checkpoints."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (adds Learner.fit_one_cycle)
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from safetensors.torch import save_file

from . import __version__
from .data import build_dataloaders, collect_items, presence_counts, severity_group_counts, ScanItem
from .errors import Cov3dError
from .loss import PRESENCE_CLASSES, SEVERITY_GROUPS, Cov3dLoss, class_weights
from .metrics import task_metrics
from .model import build_model, load_kinetics_state_dict
from .preprocess import VolumeCache, preprocess_many
from .run_figures import TrainingCurves, write_confusion_matrices
from .runtime import autocast, resolve_device, resolve_precision, use_channels_last

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = {"presence_f1": "best-presence.safetensors", "severity_f1": "best-severity.safetensors"}
SEVERITY_NAMES = ("negative", "mild", "moderate", "severe", "critical")


@dataclass
class TrainSettings:
    """Everything that defines a run; saved as config.json. Defaults follow the paper (§3.4, §3.5)."""

    depth: int = 64
    height: int = 128
    width: int = 128
    epochs: int = 40
    batch_size: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    severity_factor: float = 0.5
    presence_smoothing: float = 0.1
    severity_smoothing: float = 0.1
    penultimate: int = 512
    dropout: float = 0.5
    pool: str = "avg"
    reflect: bool = True
    fast_decode: bool = False
    seed: int = 0

    @property
    def outputs(self) -> int:
        """One presence logit when lambda = 0, else the presence logit plus z_0..z_4."""
        return 1 if self.severity_factor == 0 else 6


@dataclass
class TrainResult:
    """Where a run was written and its best validation scores."""

    run_dir: Path
    best_scores: dict[str, float] = field(default_factory=dict)


class BestCheckpoints(Callback):
    """After each epoch, save the weights (safetensors) whenever a monitored F1 improves."""

    order = 70  # after the Recorder has computed the epoch's metrics

    def __init__(self, run_dir: Path, monitored: list[str]):
        self.run_dir, self.monitored = run_dir, monitored
        self.best = {name: -math.inf for name in monitored}
        self.best_epoch = {name: -1 for name in monitored}

    def after_epoch(self) -> None:
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = dict(zip(names, self.recorder.log[1:]))
        for name in self.monitored:
            value = float(values.get(name, math.nan))
            if not math.isnan(value) and value > self.best[name]:
                self.best[name], self.best_epoch[name] = value, self.epoch
                state = {key: tensor.detach().cpu().contiguous() for key, tensor in self.model.state_dict().items()}
                save_file(state, str(self.run_dir / CHECKPOINTS[name]))


class PlainBatches(Callback):
    """Give the model plain tensors (no fastai subclass overhead), optionally channels-last 3D."""

    order = 5

    def __init__(self, channels_last: bool):
        self.channels_last = channels_last

    def before_fit(self) -> None:
        if self.channels_last:
            self.learn.model.to(memory_format=torch.channels_last_3d)

    def before_batch(self) -> None:
        volume = self.xb[0].as_subclass(torch.Tensor)
        if self.channels_last:
            volume = volume.contiguous(memory_format=torch.channels_last_3d)
        self.learn.xb = (volume,)
        self.learn.yb = tuple(y.as_subclass(torch.Tensor) for y in self.yb)


class CpuAutocast(Callback):
    """bf16 autocast of the forward pass on CPUs; the loss is computed in fp32."""

    order = 10

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def before_batch(self) -> None:
        self.context = autocast(torch.device("cpu"), self.dtype)
        self.context.__enter__()

    def after_pred(self) -> None:
        self.context.__exit__(None, None, None)
        self.learn.pred = self.pred.float()


def precision_callbacks(device: torch.device, dtype: torch.dtype | None) -> list[Callback]:
    """Callbacks for the chosen autocast dtype: fastai's AMP on CUDA, bf16 autocast on CPU."""
    callbacks: list[Callback] = [PlainBatches(use_channels_last(dtype))]
    if dtype is None:
        return callbacks
    if device.type == "cuda":
        return callbacks + [MixedPrecision(amp_mode="bf16" if dtype == torch.bfloat16 else "fp16")]
    return callbacks + [CpuAutocast(dtype)]


def prepare_volumes(items: list[ScanItem], cache: VolumeCache, workers: int | None) -> list[ScanItem]:
    """Preprocess what the cache lacks; drop (with a report) scans that failed."""
    summary = preprocess_many([item.path for item in items], cache, workers=workers)
    failed = {Path(path) for path, _ in summary.failed}
    for path, reason in summary.failed:
        print(f"Skipping {path}: {reason}")
    return [item for item in items if item.path not in failed]


def write_config(run_dir: Path, settings: TrainSettings, extra: dict) -> None:
    """config.json: sizes, hyperparameters and class names needed to rebuild the model for inference."""
    config = {
        "cov3d_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **asdict(settings),
        "outputs": settings.outputs,
        "presence_classes": list(PRESENCE_CLASSES),
        "severity_classes": list(SEVERITY_NAMES),
        "severity_groups": list(SEVERITY_GROUPS),
        "checkpoints": CHECKPOINTS,
        **extra,
    }
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def train(
    data_dir: Path,
    run_dir: Path,
    settings: TrainSettings,
    *,
    cache_dir: Path,
    pretrained_weights: Path | None = None,
    pretrained: bool = True,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    use_wandb: bool = False,
) -> TrainResult:
    """Train Cov3d on `data_dir` (COV19-CT-DB layout) and write the run to `run_dir`."""
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    set_seed(settings.seed, reproducible=True)
    items = collect_items(data_dir, with_severity=settings.severity_factor > 0)
    state_dict = load_kinetics_state_dict(pretrained_weights) if pretrained else None

    cache = VolumeCache(cache_dir, settings.depth, settings.height, settings.width, fast_decode=settings.fast_decode)
    items = prepare_volumes(items, cache, workers)
    train_items = [item for item in items if item.partition == "train"]
    if not train_items or len(train_items) == len(items):
        raise Cov3dError(f"{data_dir}: training needs readable scans in both train/ and validation/.")

    presence_weights = class_weights(presence_counts(train_items))
    severity_weights = class_weights(severity_group_counts(train_items))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, settings, {
        "data_dir": str(Path(data_dir).resolve()),
        "pretrained": str(pretrained_weights) if pretrained_weights else ("kinetics-400" if pretrained else None),
        "presence_weights": presence_weights,
        "severity_weights": severity_weights,
        "precision": str(dtype).replace("torch.", "") if dtype else "fp32",
    })

    dls = build_dataloaders(items, cache, batch_size=settings.batch_size, reflect=settings.reflect, device=torch_device)
    model = build_model(
        outputs=settings.outputs, penultimate=settings.penultimate, dropout=settings.dropout,
        pool=settings.pool, pretrained_weights=state_dict,
    )
    loss = Cov3dLoss(
        severity_factor=settings.severity_factor, presence_smoothing=settings.presence_smoothing,
        severity_smoothing=settings.severity_smoothing, presence_weights=presence_weights,
        severity_weights=severity_weights,
    )
    metrics = task_metrics(settings.severity_factor)
    checkpoints = BestCheckpoints(run_dir, [m.name for m in metrics if m.name in CHECKPOINTS])
    callbacks = [checkpoints, CSVLogger(fname=METRICS_FILE), *precision_callbacks(torch_device, dtype)]
    callbacks.append(TrainingCurves(run_dir))
    if use_wandb:
        callbacks.append(wandb_callback(run_dir, settings))

    learner = Learner(
        dls, model, loss_func=loss.to(torch_device), opt_func=Adam, metrics=metrics,
        path=run_dir, model_dir=".", wd=settings.weight_decay, cbs=callbacks,
    )
    learner.fit_one_cycle(settings.epochs, lr_max=settings.learning_rate, wd=settings.weight_decay)
    write_confusion_matrices(run_dir, dls.valid, torch_device)
    if use_wandb:
        import wandb

        wandb.finish()

    result = TrainResult(run_dir, dict(checkpoints.best))
    summary = {"best_scores": checkpoints.best, "best_epochs": checkpoints.best_epoch}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return result


def wandb_callback(run_dir: Path, settings: TrainSettings) -> Callback:
    """Start a Weights & Biases run (honours WANDB_MODE=offline) and return fastai's callback for it."""
    import wandb
    from fastai.callback.wandb import WandbCallback

    wandb.init(project="cov3d", dir=str(run_dir), config=asdict(settings), reinit=True)
    return WandbCallback(log_preds=False, log_model=False)
