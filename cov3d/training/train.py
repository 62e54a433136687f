"""Training: the fastai Learner with Adam, the 1cycle policy, the combined loss and best-F1 checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastcore.basics import noop

from cov3d.atomic import write_text_atomically
from cov3d.dataset.layout import PRESENCE_CLASSES, SEVERITY_CLASSES, SEVERITY_GROUPS
from cov3d.errors import Cov3dError
from cov3d.limits import LOADER_WORKERS, WORKERS
from cov3d.locks import writing
from cov3d.model.loss import Cov3dLoss, class_weights
from cov3d.model.metrics import task_metrics
from cov3d.model.network import build_model, load_kinetics_state_dict
from cov3d.model.original_loss import OriginalCodeLoss, pos_weight_from_counts
from cov3d.preprocessing.preprocess import VolumeCache, default_cache_dir
from cov3d.preprocessing.workers import preprocess_many
from cov3d.recipes import EVERY_SCAN, ITEM_WEIGHTS, POS_WEIGHT
from cov3d.runfiles import CONFIG_FILE, METRICS_FILE, RESUME_FILE, SUMMARY_FILE, WEIGHTS_BY_METRIC, WEIGHTS_FILES
from cov3d.runtime import Precision, choose_precision, kernel_choice, machine_description, resolve_device
from cov3d.settings import DETERMINISTIC, FASTAI_ADAM, TrainSettings
from cov3d.training.callbacks import (
    FiniteGuard,
    MetricsLog,
    OneCycleSchedule,
    StepTimer,
    WandbLog,
    finish_wandb,
    record_in_config,
    speed_line,
    start_wandb,
)
from cov3d.training.checkpoint import (
    BestCheckpoints,
    TrainingState,
    check_kept_weights,
    kept_metrics,
    load_resume_state,
    monitored_metrics,
    restore_train_loader_rng,
    resume_remedy,
)
from cov3d.training.data import TrainingItem, collect_items, presence_counts, severity_group_counts
from cov3d.training.distributed import (
    DDPTrainer,
    distributed_from_env,
    gather_objects,
    parameter_digest,
    run_on_main,
    seed_replica,
    start_distributed,
    stop_distributed,
)
from cov3d.training.evaluation import EVALUATION_PASSES_PER_TASK, evaluate_kept_weights
from cov3d.training.launch import LAUNCH_HELP, check_launch, check_same_files, check_shared_folders
from cov3d.training.loaders import training_loaders
from cov3d.training.memory import check_memory_fits
from cov3d.training.optimizer import optimizer_function
from cov3d.training.precision import precision_callbacks
from cov3d.training.progress import progress_callback
from cov3d.training.provenance import dataset_fingerprint, grey_reference, training_data, versions
from cov3d.training.run_figures import TrainingCurves, write_confusion_matrices
from cov3d.training.runconfig import (
    KINETICS_PRETRAINED,
    NEW_RUN_REMEDY,
    check_new_run,
    read_run_config,
    recorded_settings,
    remove_leftover_temporaries,
    remove_run_files,
    resumed_options,
    unfinished_first_epoch,
)
from cov3d.training.validation import record_on_device

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a run was written and its best validation scores."""

    run_dir: Path
    best_scores: dict[str, float] = field(default_factory=dict)


def prepare_volumes(items: list[TrainingItem], cache: VolumeCache, workers: int | None) -> list[TrainingItem]:
    """Preprocess what the cache lacks; drop (with a report) scans that failed."""
    summary = preprocess_many([item.path for item in items], cache, workers=workers)
    failed = {Path(path) for path, _ in summary.failed}
    for path, reason in summary.failed:
        logger.warning("Skipping %s: %s", path, reason)
    return [item for item in items if item.path not in failed]


def build_loss(settings: TrainSettings, train_items: list[TrainingItem]) -> Cov3dLoss:
    """The run's loss: the paper's (``Cov3dLoss``) with class weights from the training scans' counts,
    or with the original code's terms where the settings ask for them (``OriginalCodeLoss``)."""
    paper_terms = {
        "severity_factor": settings.severity_factor, "presence_smoothing": settings.presence_smoothing,
        "severity_smoothing": settings.severity_smoothing, "presence_averaging": settings.presence_averaging,
        "presence_weights": class_weights(presence_counts(train_items)),
        "severity_weights": class_weights(severity_group_counts(train_items)),
    }
    if (settings.severity_loss, settings.presence_weighting) == (EVERY_SCAN, ITEM_WEIGHTS):
        return Cov3dLoss(**paper_terms)
    pos_weight = pos_weight_from_counts(presence_counts(train_items)) if settings.presence_weighting == POS_WEIGHT else 1.0
    return OriginalCodeLoss(severity_loss=settings.severity_loss, presence_weighting=settings.presence_weighting,
                            pos_weight=pos_weight, **paper_terms)


def write_config(run_dir: Path, settings: TrainSettings, extra: dict) -> None:
    """config.json: sizes, hyperparameters and class names needed to rebuild the model for inference."""
    config = {
        **settings.to_config(),
        "outputs": settings.outputs,
        "presence_classes": list(PRESENCE_CLASSES),
        "severity_classes": list(SEVERITY_CLASSES),
        "severity_groups": list(SEVERITY_GROUPS),
        "checkpoints": {name: WEIGHTS_BY_METRIC[name] for name in kept_metrics(settings)},
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
    overwrite: bool = False,
    deterministic: bool = DETERMINISTIC,
) -> TrainResult:
    """Train Cov3d on `data_dir` (COV19-CT-DB layout) and write the run to `run_dir`.

    With `resume`, continue the run in `run_dir` from its last end-of-epoch checkpoint. Launched by
    torchrun, every process trains on its shard of the data and only rank 0 writes files.
    A new run refuses a `run_dir` that holds a run already (``cov3d.training.runconfig.check_new_run``),
    unless `overwrite`: the earlier run's files are then removed before the first is written.
    `deterministic` picks deterministic kernels (the same seed gives the same run) or the fastest ones.
    """
    arguments = {
        "data_dir": str(Path(data_dir).resolve()), "run_dir": str(Path(run_dir).resolve()), "cache_dir": str(cache_dir),
        "pretrained_weights": str(pretrained_weights) if pretrained_weights else None, "pretrained": pretrained,
        "device": device, "precision": precision, "workers": workers, "loader_workers": loader_workers,
        "wandb": use_wandb, "deterministic": deterministic, "command": sys.argv,
    }
    WORKERS.check("workers", workers)
    LOADER_WORKERS.check("loader_workers", loader_workers)
    dist = distributed_from_env()
    requested = resolve_device(device)
    check_launch(dist, requested.type)
    torch_device, started = start_distributed(dist, requested)
    # Only the main process writes the run: it alone holds the run folder's lock (cov3d.locks).
    locked = writing(run_dir, "--output-dir") if dist.is_main else contextlib.nullcontext()
    try:
        with kept_determinism_flags(), locked:
            return _train(
                Path(data_dir), Path(run_dir), settings, cache_dir=cache_dir, pretrained_weights=pretrained_weights,
                pretrained=pretrained, torch_device=torch_device, precision=choose_precision(precision, torch_device, resumed=resume),
                workers=workers, loader_workers=loader_workers, use_wandb=use_wandb, resume=resume, dist=dist,
                arguments=arguments, overwrite=overwrite, deterministic=deterministic,
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


def seed_everything(seed: int, device: torch.device, deterministic: bool = DETERMINISTIC) -> str:
    """Seed Python, NumPy and torch and switch to deterministic (or the fastest) kernels; returns how
    reproducible that makes the run on `device` (``cov3d.runtime.kernel_choice``)."""
    set_seed(seed)
    return kernel_choice(device, deterministic)


def _train(data_dir, run_dir, settings, *, cache_dir, pretrained_weights, pretrained, torch_device, precision: Precision,
           workers, loader_workers, use_wandb, resume, dist, arguments, overwrite=False,
           deterministic=DETERMINISTIC) -> TrainResult:
    dtype = precision.dtype
    reproducibility = seed_everything(settings.seed, torch_device, deterministic)
    if dist.is_main:
        remove_leftover_temporaries(run_dir)  # no other writer: this process holds the folder's lock
        logger.info("Precision: %s on %s (%s)", precision.name, torch_device, precision.reason)
        logger.info("Reproducibility: %s", reproducibility)
    if resume:
        check_shared_folders(dist, {"run folder": run_dir})
    resume_state = load_resume_state(run_dir) if resume else None
    first_epoch = 0 if resume_state is None else resume_state["epoch"] + 1
    fitted = first_epoch >= settings.epochs  # stopped after its last epoch: only the evaluation is left
    if fitted:
        if (run_dir / SUMMARY_FILE).exists():
            raise Cov3dError(f"{run_dir} already finished its {settings.epochs} epochs; there is nothing to resume.")
        check_kept_weights(run_dir, settings, resume_state)
        if dist.is_main:
                logger.info("%s trained its %d epochs but stopped before the evaluation after training (no %s): "
                        "evaluating its kept weights now.", run_dir, settings.epochs, SUMMARY_FILE)
    items = collect_items(data_dir, with_severity=settings.severity_factor > 0)
    check_batch_fits(items, settings.batch_size, dist.world_size, data_dir)
    earlier_run = [] if resume_state is not None else check_new_run(run_dir, overwrite=overwrite, inputs=[item.path for item in items])
    state_dict = load_kinetics_state_dict(pretrained_weights) if pretrained and resume_state is None else None

    cache = VolumeCache(cache_dir, settings.shape)
    items = run_on_main(dist, lambda: prepare_volumes(items, cache, workers))
    train_items = [item for item in items if item.partition == "train"]
    if not train_items or len(train_items) == len(items):
        raise Cov3dError(f"{data_dir}: training needs readable scans in both train/ and validation/.")
    check_batch_fits(items, settings.batch_size, dist.world_size, data_dir)
    fingerprint = dataset_fingerprint(items)
    if resume_state is not None:
        check_same_dataset(run_dir, fingerprint)

    loss = build_loss(settings, train_items)
    if dist.is_main and resume_state is None:
        remove_run_files(run_dir, earlier_run)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, settings, {
            "data_dir": str(data_dir.resolve()),
            "pretrained": str(pretrained_weights) if pretrained_weights else (KINETICS_PRETRAINED if pretrained else None),
            "presence_weights": class_weights(presence_counts(train_items)),
            "severity_weights": class_weights(severity_group_counts(train_items)),
            "presence_pos_weight": getattr(loss, "pos_weight", None),
            "precision": precision.name,
            "precision_reason": precision.reason,
            "deterministic": deterministic,
            "world_size": dist.world_size,
            "dataset_fingerprint": fingerprint,
            "training_data": training_data(data_dir),
            "grey_reference": grey_reference(train_items, cache),
            "versions": versions(),
            "arguments": arguments,
        })
    check_shared_folders(dist, {"cache folder": cache_dir, **({} if resume_state else {"run folder": run_dir})})

    dls = training_loaders(items, cache, batch_size=settings.batch_size, reflect=settings.reflect,
                           validation_reflection=settings.validation_reflection, device=torch_device,
                           workers=loader_workers, dist=dist)
    model = build_model(
        outputs=settings.outputs, penultimate=settings.penultimate, dropout=settings.dropout,
        pool=settings.pool, final_bias=settings.final_bias, pretrained_weights=state_dict,
    )
    if dist.enabled:  # after the loaders (same shuffling everywhere) and the model (same initial weights)
        seed_replica(settings.seed, dist.rank)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    metrics = task_metrics(settings.severity_factor)
    checkpoints = BestCheckpoints(run_dir, monitored_metrics(settings), first_epoch, dist.is_main, kept_metrics(settings))
    if resume_state is not None:
        checkpoints.best.update(resume_state["best"])
        checkpoints.best_epoch.update(resume_state["best_epoch"])
    callbacks = [
        OneCycleSchedule(settings, first_epoch), checkpoints,
        MetricsLog(run_dir / METRICS_FILE, first_epoch, dist.is_main),
        TrainingState(run_dir / RESUME_FILE, checkpoints, first_epoch, resume_state, dist.is_main,
                      gather=lambda value: gather_objects(dist, value), rank=dist.rank),
        *precision_callbacks(torch_device, dtype), TrainingCurves(run_dir),
        FiniteGuard(run_dir=run_dir, epochs=settings.epochs, first_epoch=first_epoch, precision=precision.name,
                    learning_rate=settings.learning_rate, check_gradients=dtype != torch.float16),
    ]
    if dist.is_main:
        def announce(speed: dict) -> None:
            logger.info(speed_line(speed))
            record_in_config(run_dir, "speed", speed)

        callbacks.append(StepTimer(announce, str(settings.shape), machine_description(torch_device), precision.name,
                                   EVALUATION_PASSES_PER_TASK * len(monitored_metrics(settings))))
    if dist.enabled:
        callbacks.append(DDPTrainer(torch_device))
    if use_wandb and dist.is_main:
        start_wandb(run_dir, resume=resume_state is not None)
        callbacks.append(WandbLog(first_epoch))

    check_memory_fits(settings, dtype, torch_device)  # a one-line error with what fits, not an out-of-memory error
    fit_wd = settings.weight_decay if settings.optimizer == FASTAI_ADAM else None  # else in the optimiser's groups
    learner = Learner(
        dls, model, loss_func=loss.to(torch_device), metrics=metrics, path=run_dir, model_dir=".", wd=fit_wd, cbs=callbacks,
        opt_func=optimizer_function(settings.optimizer, model, settings.weight_decay),
    )
    record_on_device(learner, dist, torch_device)
    learner.remove_cb(ProgressCallback)
    if dist.is_main:
        learner.add_cb(progress_callback(first_epoch, settings.epochs))
    else:
        learner.logger = noop
    if fitted:
        restore_train_loader_rng(dls, resume_state)  # as the fit left it, for the replica record
    else:
        learner.fit(settings.epochs - first_epoch, lr=settings.learning_rate, wd=fit_wd)
    if all(math.isinf(value) for value in checkpoints.best.values()):
        raise Cov3dError(
            f"{run_dir}: every epoch ended with non-finite weights (NaN or infinity), so no best weights were kept. "
            "Train again with --precision fp32 or a lower --learning-rate."
        )
    replicas = gather_objects(dist, replica_record(learner, dls))
    check_same_files(dist, [run_dir / name for name in WEIGHTS_FILES.values()],  # each that the evaluation loads
                     f"wait a minute and evaluate them with 'cov3d train --resume {run_dir}' ({LAUNCH_HELP}).")
    # Every process scores its share of the validation batches with the kept weights, in the run's precision.
    write_confusion_matrices(run_dir, dls.valid, torch_device, dtype, dist)
    evaluation = evaluate_kept_weights(run_dir, dls.valid, torch_device, dtype=dtype, dist=dist)
    if not dist.is_main:
        return TrainResult(run_dir, dict(checkpoints.best))
    # A task never scored (no graded validation scan) has no best score: null, not -Infinity (not JSON).
    best_scores = {name: value if math.isfinite(value) else None for name, value in checkpoints.best.items()}
    summary = {"best_scores": best_scores, "best_epochs": checkpoints.best_epoch, **evaluation,
               **{f"replica_{key}": [replica[key] for replica in replicas] for key in replicas[0]}}
    write_text_atomically(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False), resume_remedy(run_dir))
    if use_wandb:
        finish_wandb(checkpoints.best, checkpoints.best_epoch)
    return TrainResult(run_dir, dict(checkpoints.best))


def check_batch_fits(items: list[TrainingItem], batch_size: int, world_size: int, data_dir: Path) -> None:
    """Refuse a batch larger than a process's share of the training scans: the training loader
    drops incomplete batches, so an epoch would take no step and keep the initial weights."""
    scans = sum(item.partition == "train" for item in items)
    per_process = -(-scans // world_size)
    if batch_size > per_process:
        share = f"{per_process} per process of the {scans}" if world_size > 1 else f"the {scans}"
        raise Cov3dError(
            f"`batch_size={batch_size}` is larger than {share} readable training scans in {data_dir / 'train'}: "
            f"an epoch would take no step. Use `batch_size={max(1, per_process)}` or less."
        )


def replica_record(learner: Learner, dls) -> dict[str, str | int]:
    """What summary.json lists per process: the SHA-256 of its final weights (equal when the replicas stayed in
    sync), its own seed (different under DDP) and a digest of its shuffler (equal: one shuffled order, sharded)."""
    shuffler = hashlib.sha256(repr(dls.train.rng.getstate()).encode()).hexdigest()[:16]
    return {"digests": parameter_digest(learner.model), "seeds": torch.initial_seed(), "shufflers": shuffler}


def check_same_dataset(run_dir: Path, fingerprint: str) -> None:
    """Refuse to resume on a dataset other than the one the run started with."""
    recorded = read_run_config(run_dir).get("dataset_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise Cov3dError(
            f"{run_dir / CONFIG_FILE}: the dataset changed since this run started (scans, labels or slice counts); "
            "resume with the original data or start a new run."
        )


def resume_training(run_dir: Path, **overrides) -> TrainResult:
    """Continue the run in `run_dir` as it was started: its settings and its data folder, cache
    folder, device, precision, workers and W&B logging from config.json (``cov3d.training.runconfig``).

    `overrides` (keyword arguments of `train`, including ``data_dir``) replace recorded options;
    each that differs is logged as one line.
    """
    config = read_run_config(run_dir)
    settings = recorded_settings(config, run_dir, TrainSettings)
    options, messages = resumed_options(config, overrides)
    for message in messages:
        logger.info(message)
    if options["cache_dir"] is None:
        options["cache_dir"] = default_cache_dir()
    data_dir = options.pop("data_dir")
    if unfinished_first_epoch(run_dir):
        logger.info("%s had not finished an epoch (no %s): starting it again with its recorded settings.", run_dir, RESUME_FILE)
        pretrained = config.get("pretrained")
        options["pretrained"] = pretrained is not None
        options["pretrained_weights"] = None if pretrained in (None, KINETICS_PRETRAINED) else Path(pretrained)
        return train(Path(data_dir), Path(run_dir), settings, **options)
    options.setdefault("pretrained", False)  # the weights come from the checkpoint
    return train(Path(data_dir), Path(run_dir), settings, resume=True, **options)
