"""Training loaders that keep the model fed: worker processes, pinned memory, non-blocking GPU copies, DDP shards."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.load import _FakeLoader, _wif
from fasttransform import Transform

from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.preprocessing.workers import available_cpus, die_with_parent, pool_context
from cov3d.training.data import TrainingItem, build_datablock
from cov3d.training.distributed import Distributed, ShardedDL, ShardedValidDL

CUDA_LOADER_WORKERS = 4
"""Default loader processes per GPU: loading a cached volume takes a small part of a training step (docs/benchmarks.md)."""
WORKER_PRELOAD = ("cov3d.training.data",)
"""Modules the loader workers' fork server imports once (fastai and the DataBlock's transforms)."""


def default_loader_workers(device: torch.device, processes_per_node: int = 1) -> int:
    """0 on CPUs (workers would compete with the model for cores); on GPUs up to 4 per training process,
    leaving each process a core: `processes_per_node` is torchrun's LOCAL_WORLD_SIZE (1 without DDP)."""
    if device.type != "cuda":
        return 0
    return max(0, min(CUDA_LOADER_WORKERS, available_cpus() // max(1, processes_per_node) - 1))


def init_loader_worker(worker_id: int) -> None:
    """fastai's worker set-up, in a worker that ends when the training process dies (``die_with_parent``)."""
    die_with_parent()
    _wif(worker_id)


class ForkServerLoader(_FakeLoader):
    """fastai's inner loader with worker processes started from a fork server (``pool_context``)
    instead of forked from the training process, which by then holds CUDA and OpenMP threads;
    the workers end when the training process dies (``init_loader_worker``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.worker_init_fn = init_loader_worker

    @property
    def multiprocessing_context(self):
        return pool_context(*WORKER_PRELOAD) if self.num_workers > 0 else None


def use_fork_server(loader: TfmdDL) -> TfmdDL:
    """Give `loader` a ``ForkServerLoader`` (same settings); returns it."""
    inner = loader.fake_l
    loader.fake_l = ForkServerLoader(inner.d, inner.pin_memory, inner.num_workers, inner.timeout,
                                     inner.persistent_workers, inner.pin_memory_device)
    return loader


class AsyncToDevice(Transform):
    """Copy a batch's tensors to `device` without blocking the host (from pinned memory on CUDA)."""

    order = -100  # before any other batch transform

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def encodes(self, x: torch.Tensor):  # no return annotation: fastcore would cast the result to it
        return x.to(self.device, non_blocking=True)


def training_loaders(
    items: Sequence[TrainingItem],
    cache: VolumeCache,
    *,
    batch_size: int,
    reflect: bool,
    validation_reflection: bool = False,
    device: torch.device,
    workers: int | None,
    dist: Distributed,
) -> DataLoaders:
    """Train (shuffled, reflected, sharded under DDP) and validation (sharded by whole batches under DDP)
    loaders of `items` (validation reflected at random too with `validation_reflection`, as the original
    code did).

    Batches are collated by `workers` processes (default: `default_loader_workers`) into pinned
    memory on CUDA and copied to the device by `AsyncToDevice`, so the copy overlaps the GPU's work.
    Workers are not persistent: each epoch seeds them from the torch RNG, which a resumed run restores.
    They start from a fork server, never forked from this process (``ForkServerLoader``).
    """
    workers = default_loader_workers(device, dist.local_world_size) if workers is None else workers
    block = build_datablock(cache, reflect=reflect, validation_reflection=validation_reflection)
    block.batch_tfms = [*block.batch_tfms, AsyncToDevice(device)]
    dls = block.dataloaders(
        list(items), bs=batch_size, num_workers=workers, pin_memory=device.type == "cuda", device=device
    )
    for loader in dls.loaders:
        loader.device = None  # the loader's own copy would block; AsyncToDevice does it instead
    if dist.enabled:
        dls.loaders[0] = dls.train.new(cls=ShardedDL, rank=dist.rank, world_size=dist.world_size)
        dls.loaders[1] = dls.valid.new(cls=ShardedValidDL, rank=dist.rank, world_size=dist.world_size)
    for loader in dls.loaders:
        use_fork_server(loader)
    return dls
