"""Training measured as ``cov3d train`` runs it, for the benchmarks and the accelerator check
(``scripts/``): synthetic data preprocessed at a size, the loaders, model and loss as training builds
them, and the peak device memory of one training step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.optimizer import Adam

from cov3d.demo_settings import DemoSettings
from cov3d.model.loss import Cov3dLoss, class_weights
from cov3d.model.metrics import task_metrics
from cov3d.model.network import build_model
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import preprocess_many
from cov3d.settings import DETERMINISTIC, TrainSettings, VolumeShape
from cov3d.synthetic.generator import VALIDATION_SHARE, generate_dataset
from cov3d.training.callbacks import OneCycleSchedule
from cov3d.training.data import TrainingItem, collect_items, presence_counts, severity_group_counts
from cov3d.training.distributed import Distributed
from cov3d.training.loaders import training_loaders
from cov3d.training.precision import precision_callbacks
from cov3d.training.train import seed_everything

MIN_SLICE_SIZE = 32
"""Synthetic slices are drawn at least this large, then resized to the shape."""


def make_dataset(work: Path, shape: VolumeShape, batches: int, batch_size: int) -> tuple[list[TrainingItem], VolumeCache]:
    """Synthetic scans preprocessed at ``shape``: enough training scans for ``batches`` full batches."""
    scans = math.ceil(batches * batch_size / (1 - VALIDATION_SHARE)) + 2
    generate_dataset(work / "data", scans=scans, test_scans=0, seed=0, slice_size=max(shape.width, MIN_SLICE_SIZE), depth_scale=0.05)
    cache = VolumeCache(work / "cache", shape)
    items = collect_items(work / "data")
    preprocess_many([item.path for item in items], cache)
    return items, cache


def training_parts(items: list[TrainingItem], cache: VolumeCache, settings: TrainSettings, device: torch.device,
                   deterministic: bool = DETERMINISTIC):
    """Loaders, a freshly seeded model and the combined loss, as ``cov3d train`` builds them (with its
    seeding and choice of kernels, so that timings are those of training), in one process."""
    seed_everything(settings.seed, device, deterministic)
    train_items = [item for item in items if item.partition == "train"]
    dls = training_loaders(items, cache, batch_size=settings.batch_size, reflect=True, device=device, workers=0,
                           dist=Distributed())
    model = build_model(outputs=settings.outputs, penultimate=settings.penultimate, dropout=settings.dropout,
                        pool=settings.pool, final_bias=settings.final_bias)
    loss = Cov3dLoss(severity_factor=settings.severity_factor, presence_weights=class_weights(presence_counts(train_items)),
                     severity_weights=class_weights(severity_group_counts(train_items)),
                     presence_averaging=settings.presence_averaging)
    return dls, model, loss.to(device)


class FirstStepOnly(Callback):
    """End the fit after its first training batch (forward, backward and optimiser step)."""

    order = 100

    def after_batch(self) -> None:
        if self.training:
            raise CancelFitException()


def peak_memory(items, cache, settings: TrainSettings, device: torch.device, dtype: torch.dtype | None) -> float:
    """Peak GiB allocated on `device` by the first training step of the Learner as `cov3d train` builds it
    (loaders, precision callbacks, channels-last, loss, Adam: its state is created in that step)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    dls, model, loss = training_parts(items, cache, settings, device)
    callbacks = [OneCycleSchedule(dataclasses.replace(settings, epochs=1)), *precision_callbacks(device, dtype), FirstStepOnly()]
    learner = Learner(dls, model, loss_func=loss, opt_func=Adam, metrics=task_metrics(settings.severity_factor),
                      wd=settings.weight_decay, cbs=callbacks)
    learner.remove_cb(ProgressCallback)
    learner.fit(1, lr=settings.learning_rate, wd=settings.weight_decay)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del learner, model, dls
    torch.cuda.empty_cache()
    return peak


class TrainTimer(Callback):
    """Wall time of the training batches after the first `warmup` ones (synchronising CUDA)."""

    order = 100

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.start, self.timed = warmup, device, None, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_batch(self) -> None:
        if self.training and self.iter == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def after_batch(self) -> None:
        if self.training and self.iter >= self.warmup:
            self.timed += len(self.learn.yb[0])

    def after_train(self) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start


def fastai_loop(items, cache, settings: TrainSettings, device: torch.device, dtype: torch.dtype | None, warmup: int,
                deterministic: bool = DETERMINISTIC) -> float:
    """Samples/s of one epoch's training batches after the first `warmup`, through the Learner as `cov3d train`
    builds it (callbacks, 1cycle, metrics, progress bar) with deterministic kernels or the fastest ones."""
    dls, model, loss = training_parts(items, cache, settings, device, deterministic)
    timer = TrainTimer(warmup, device)
    callbacks = [OneCycleSchedule(dataclasses.replace(settings, epochs=1)), *precision_callbacks(device, dtype), timer]
    learner = Learner(dls, model, loss_func=loss, opt_func=Adam, metrics=task_metrics(settings.severity_factor),
                      wd=settings.weight_decay, cbs=callbacks)
    learner.fit(1, lr=settings.learning_rate, wd=settings.weight_decay)
    return timer.timed / timer.seconds


def demo_step_parts(shape: VolumeShape, batch_size: int, demo: DemoSettings) -> tuple[torch.Tensor, torch.Tensor, Cov3dLoss, torch.nn.Module]:
    """What a benchmark of one training step of the demo's network needs: a random batch (B, 1, D, H, W)
    (seeded), labels (B, 2) with every severity, the demo's loss with balanced class weights and an
    untrained network of the demo's head and dropout."""
    torch.manual_seed(0)
    volume = torch.rand(batch_size, 1, *shape.dims)
    has_covid = torch.arange(batch_size) % 2
    target = torch.stack([has_covid, has_covid * (1 + torch.arange(batch_size) % 4)], dim=1)
    loss_func = Cov3dLoss(severity_factor=demo.severity_factor, presence_weights=class_weights([1, 1]),
                          severity_weights=class_weights([1, 1, 1, 1, 1, 1]))
    model = build_model(penultimate=demo.penultimate, dropout=demo.dropout, pretrained_weights=None)
    return volume, target, loss_func, model
