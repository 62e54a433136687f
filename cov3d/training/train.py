"""Training: the fastai Learner with Adam, the 1cycle policy, the combined loss and best-F1 checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from fastcore.basics import noop
from safetensors.torch import save as safetensors_bytes

from cov3d.atomic import write_bytes_atomically, write_text_atomically
from cov3d.dataset.intensity import DEFAULT_WINDOW, Window
from cov3d.dataset.layout import PRESENCE_CLASSES, SEVERITY_CLASSES, SEVERITY_GROUPS
from cov3d.errors import Cov3dError
from cov3d.model.files import CHECKPOINTS as TASK_CHECKPOINTS, CONFIG_FILE
from cov3d.model.loss import Cov3dLoss, class_weights, model_outputs
from cov3d.model.metrics import task_metrics
from cov3d.model.network import POOLS, build_model, load_kinetics_state_dict
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import preprocess_many
from cov3d.runtime import Precision, autocast, choose_precision, resolve_device, use_channels_last
from cov3d.training.bf16_convs import checked_bf16_convs
from cov3d.training.callbacks import FiniteGuard, MetricsLog, OneCycleSchedule, WandbLog
from cov3d.training.checkpoint import (
    RESUME_FILE,
    TrainingState,
    load_optimizer_state,
    load_resume_state,
    resume_remedy,
    unwrap,
)
from cov3d.training.data import TrainingItem, collect_items, presence_counts, severity_group_counts
from cov3d.training.distributed import (
    DDPTrainer,
    distributed_from_env,
    gather_strings,
    main_first,
    parameter_digest,
    start_distributed,
    stop_distributed,
)
from cov3d.training.loaders import training_loaders
from cov3d.training.provenance import dataset_fingerprint, versions
from cov3d.training.run_figures import TrainingCurves, write_confusion_matrices

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
NEW_RUN_REMEDY = "Free some space or choose another --output-dir."
CHECKPOINTS = {f"{task}_f1": name for task, name in TASK_CHECKPOINTS.items()}
"""The best weights of each monitored metric (the files ``cov3d.model.files`` reads)."""
WANDB_PROJECT = "cov3d"
WANDB_ID_BYTES = 4  # run ids of 8 hex characters, kept in config.json so that a resumed run logs to the same W&B run


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
    window: str = str(DEFAULT_WINDOW)
    """The HU -> grey mapping (``LEVEL,WIDTH``) of DICOM/NIfTI scans; the model expects it at inference."""

    def __post_init__(self) -> None:
        """Reject settings the model cannot be built with, before any data is read."""
        if not 0.0 <= self.dropout < 1.0:
            raise Cov3dError(f"dropout must satisfy 0 <= dropout < 1, got {self.dropout}.")
        if self.pool not in POOLS:
            raise Cov3dError(f"pool must be one of {', '.join(POOLS)}, got '{self.pool}'.")
        self.window = str(Window.parse(self.window))

    @property
    def outputs(self) -> int:
        """Logits of the model (``cov3d.model.loss.model_outputs``)."""
        return model_outputs(self.severity_factor)


@dataclass
class TrainResult:
    """Where a run was written and its best validation scores."""

    run_dir: Path
    best_scores: dict[str, float] = field(default_factory=dict)


class BestCheckpoints(Callback):
    """After each epoch, save the weights (safetensors) whenever a monitored F1 improves."""

    order = 70  # after the Recorder has computed the epoch's metrics

    def __init__(self, run_dir: Path, monitored: list[str], first_epoch: int = 0, write: bool = True):
        self.run_dir, self.monitored, self.first_epoch, self.write = run_dir, monitored, first_epoch, write
        self.best = {name: -math.inf for name in monitored}
        self.best_epoch = {name: -1 for name in monitored}

    def after_epoch(self) -> None:
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = dict(zip(names, self.recorder.log[1:]))
        for name in self.monitored:
            value = float(values.get(name, math.nan))
            if not math.isnan(value) and value > self.best[name]:
                self.best[name], self.best_epoch[name] = value, self.first_epoch + self.epoch
                if self.write:
                    state = {key: t.detach().cpu().contiguous() for key, t in unwrap(self.model).state_dict().items()}
                    write_bytes_atomically(self.run_dir / CHECKPOINTS[name], safetensors_bytes(state), resume_remedy(self.run_dir))


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


def prepare_volumes(items: list[TrainingItem], cache: VolumeCache, workers: int | None) -> list[TrainingItem]:
    """Preprocess what the cache lacks; drop (with a report) scans that failed."""
    summary = preprocess_many([item.path for item in items], cache, workers=workers)
    failed = {Path(path) for path, _ in summary.failed}
    for path, reason in summary.failed:
        print(f"Skipping {path}: {reason}")
    return [item for item in items if item.path not in failed]


def write_config(run_dir: Path, settings: TrainSettings, extra: dict) -> None:
    """config.json: sizes, hyperparameters and class names needed to rebuild the model for inference."""
    config = {
        **asdict(settings),
        "outputs": settings.outputs,
        "presence_classes": list(PRESENCE_CLASSES),
        "severity_classes": list(SEVERITY_CLASSES),
        "severity_groups": list(SEVERITY_GROUPS),
        "checkpoints": CHECKPOINTS,
        **extra,
    }
    write_text_atomically(run_dir / CONFIG_FILE, json.dumps(config, indent=2), NEW_RUN_REMEDY)


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
    loader_workers: int | None = None,
    use_wandb: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Train Cov3d on `data_dir` (COV19-CT-DB layout) and write the run to `run_dir`.

    With `resume`, continue the run in `run_dir` from its last end-of-epoch checkpoint. Launched by
    torchrun, every process trains on its shard of the data and only rank 0 writes files.
    """
    arguments = {
        "data_dir": str(Path(data_dir).resolve()), "run_dir": str(Path(run_dir).resolve()), "cache_dir": str(cache_dir),
        "pretrained_weights": str(pretrained_weights) if pretrained_weights else None, "pretrained": pretrained,
        "device": device, "precision": precision, "workers": workers, "loader_workers": loader_workers,
        "wandb": use_wandb, "command": sys.argv,
    }
    dist = distributed_from_env()
    torch_device, started = start_distributed(dist, resolve_device(device))
    try:
        with kept_determinism_flags():
            return _train(
                Path(data_dir), Path(run_dir), settings, cache_dir=cache_dir, pretrained_weights=pretrained_weights,
                pretrained=pretrained, torch_device=torch_device, precision=choose_precision(precision, torch_device),
                workers=workers, loader_workers=loader_workers, use_wandb=use_wandb, resume=resume, dist=dist,
                arguments=arguments,
            )
    finally:
        stop_distributed(started)


@contextlib.contextmanager
def kept_determinism_flags() -> Iterator[None]:
    """Give back torch's global determinism settings that ``seed_everything`` changes:
    deterministic algorithms (and warn-only), cuDNN's deterministic and benchmark flags."""
    saved = (
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
    )
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed Python, NumPy and torch; deterministic cuDNN, and deterministic kernels on CPUs."""
    set_seed(seed, reproducible=True)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def _train(data_dir, run_dir, settings, *, cache_dir, pretrained_weights, pretrained, torch_device, precision: Precision,
           workers, loader_workers, use_wandb, resume, dist, arguments) -> TrainResult:
    dtype = precision.dtype
    if dist.is_main:
        logger.info("Precision: %s on %s (%s)", precision.name, torch_device, precision.reason)
    seed_everything(settings.seed, torch_device)
    resume_state = load_resume_state(run_dir) if resume else None
    items = collect_items(data_dir, with_severity=settings.severity_factor > 0)
    state_dict = load_kinetics_state_dict(pretrained_weights) if pretrained and resume_state is None else None

    cache = VolumeCache(cache_dir, settings.depth, settings.height, settings.width, fast_decode=settings.fast_decode,
                        window=settings.window)
    items = main_first(dist, lambda: prepare_volumes(items, cache, workers))
    train_items = [item for item in items if item.partition == "train"]
    if not train_items or len(train_items) == len(items):
        raise Cov3dError(f"{data_dir}: training needs readable scans in both train/ and validation/.")
    fingerprint = dataset_fingerprint(items)
    if resume_state is not None:
        check_same_dataset(run_dir, fingerprint)

    presence_weights = class_weights(presence_counts(train_items))
    severity_weights = class_weights(severity_group_counts(train_items))
    if dist.is_main and resume_state is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, settings, {
            "data_dir": str(data_dir.resolve()),
            "pretrained": str(pretrained_weights) if pretrained_weights else ("kinetics-400" if pretrained else None),
            "presence_weights": presence_weights,
            "severity_weights": severity_weights,
            "precision": precision.name,
            "precision_reason": precision.reason,
            "world_size": dist.world_size,
            "dataset_fingerprint": fingerprint,
            "versions": versions(),
            "arguments": arguments,
        })

    dls = training_loaders(items, cache, batch_size=settings.batch_size, reflect=settings.reflect,
                           device=torch_device, workers=loader_workers, dist=dist)
    model = build_model(
        outputs=settings.outputs, penultimate=settings.penultimate, dropout=settings.dropout,
        pool=settings.pool, pretrained_weights=state_dict,
    )
    first_epoch = 0 if resume_state is None else resume_state["epoch"] + 1
    if first_epoch >= settings.epochs:
        raise Cov3dError(f"{run_dir} already finished its {settings.epochs} epochs; there is nothing to resume.")
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    loss = Cov3dLoss(
        severity_factor=settings.severity_factor, presence_smoothing=settings.presence_smoothing,
        severity_smoothing=settings.severity_smoothing, presence_weights=presence_weights,
        severity_weights=severity_weights,
    )
    metrics = task_metrics(settings.severity_factor)
    checkpoints = BestCheckpoints(run_dir, [m.name for m in metrics if m.name in CHECKPOINTS], first_epoch, dist.is_main)
    if resume_state is not None:
        checkpoints.best.update(resume_state["best"])
        checkpoints.best_epoch.update(resume_state["best_epoch"])
    callbacks = [
        OneCycleSchedule(settings.learning_rate, settings.epochs, first_epoch), checkpoints,
        MetricsLog(run_dir / METRICS_FILE, first_epoch, dist.is_main),
        TrainingState(run_dir / RESUME_FILE, checkpoints, first_epoch, resume_state, dist.is_main),
        *precision_callbacks(torch_device, dtype), TrainingCurves(run_dir),
        FiniteGuard(run_dir=run_dir, epochs=settings.epochs, first_epoch=first_epoch, precision=precision.name,
                    learning_rate=settings.learning_rate, check_gradients=dtype != torch.float16),
    ]
    if dist.enabled:
        callbacks.append(DDPTrainer(torch_device))
    if use_wandb and dist.is_main:
        start_wandb(run_dir, resume=resume_state is not None)
        callbacks.append(WandbLog(first_epoch))

    learner = Learner(
        dls, model, loss_func=loss.to(torch_device), opt_func=Adam, metrics=metrics,
        path=run_dir, model_dir=".", wd=settings.weight_decay, cbs=callbacks,
    )
    if not dist.is_main:
        learner.remove_cb(ProgressCallback)
        learner.logger = noop
    if resume_state is not None:
        learner.create_opt()
        load_optimizer_state(learner.opt, resume_state["optimizer"])
    on_cpu_bf16 = dtype == torch.bfloat16 and torch_device.type == "cpu"
    with checked_bf16_convs(model) if on_cpu_bf16 else contextlib.nullcontext():
        learner.fit(settings.epochs - first_epoch, lr=settings.learning_rate, wd=settings.weight_decay)
    write_confusion_matrices(run_dir, dls.valid, torch_device)

    digests = gather_strings(dist, parameter_digest(learner.model))
    summary = {"best_scores": checkpoints.best, "best_epochs": checkpoints.best_epoch, "replica_digests": digests}
    if dist.is_main:
        write_text_atomically(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2), resume_remedy(run_dir))
    if use_wandb and dist.is_main:
        finish_wandb(checkpoints)
    return TrainResult(run_dir, dict(checkpoints.best))


def check_same_dataset(run_dir: Path, fingerprint: str) -> None:
    """Refuse to resume on a dataset other than the one the run started with."""
    recorded = json.loads((run_dir / CONFIG_FILE).read_text()).get("dataset_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise Cov3dError(
            f"{run_dir / CONFIG_FILE}: the dataset changed since this run started (scans, labels or slice counts); "
            "resume with the original data or start a new run."
        )


def resume_training(run_dir: Path, **options) -> TrainResult:
    """Continue the run in `run_dir` with its recorded data folder and settings; `options` as for `train`."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise Cov3dError(f"{config_path} not found: --resume needs a run folder written by 'cov3d train'.")
    config = json.loads(config_path.read_text())
    settings = TrainSettings(**{f.name: config[f.name] for f in fields(TrainSettings) if f.name in config})
    options.setdefault("pretrained", False)  # the weights come from the checkpoint
    return train(Path(config["data_dir"]), Path(run_dir), settings, resume=True, **options)


def start_wandb(run_dir: Path, *, resume: bool = False) -> None:
    """Start (or, resuming, continue) a Weights & Biases run whose config is the run's config.json.

    `WandbLog` then logs every epoch and `finish_wandb` the best scores. Honours WANDB_MODE=offline.
    """
    import wandb

    config = json.loads((run_dir / CONFIG_FILE).read_text())
    run_id = config.get("wandb_id") or secrets.token_hex(WANDB_ID_BYTES)
    if "wandb_id" not in config:
        write_text_atomically(run_dir / CONFIG_FILE, json.dumps({**config, "wandb_id": run_id}, indent=2), NEW_RUN_REMEDY)
    wandb.init(project=WANDB_PROJECT, dir=str(run_dir), id=run_id, name=run_dir.name, config=config,
               resume="allow" if resume else None, reinit=True)


def finish_wandb(checkpoints: BestCheckpoints) -> None:
    """Record the best scores and their epochs in the W&B run summary and close the run."""
    import wandb

    for name, value in checkpoints.best.items():
        wandb.run.summary[f"best_{name}"] = value
        wandb.run.summary[f"best_{name}_epoch"] = checkpoints.best_epoch[name]
    wandb.finish()
