"""Data-parallel training with PyTorch DDP, launched by `torchrun` (one process per GPU, or CPU processes).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE (and MASTER_ADDR/PORT) for every
process; without them training runs in a single process. Each process trains on its own shard of
every epoch's shuffled training order, DDP averages the gradients, and each process validates its
share of the validation batches (``ShardedValidDL``): the predictions are gathered once per pass so
that every process scores the whole set, as one process would (``cov3d.training.validation``). Only
the main process (rank 0) writes files.

Two process groups: the default one (nccl on GPUs, gloo on CPUs) carries DDP's gradient all-reduces
with ``TRAINING_TIMEOUT``; a gloo group on the host carries the coordination around work that rank 0
does alone (preprocessing and checking the cache, which can take hours at the large size) with
``MAIN_ONLY_TIMEOUT`` (``$COV3D_DDP_WAIT_MINUTES``), so that the other ranks can wait for it without
hitting NCCL's timeout. (If rank 0 fails, torchrun stops the others at once: the long wait costs nothing.)

Shuffling is identical in every process (the loaders are built before any per-process seeding);
dropout masks and reflections are drawn from per-process seeds (``replica_seed``).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from fastai.callback.core import Callback
from fastai.data.core import TfmdDL
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
CPU_BACKEND = "gloo"
CUDA_BACKEND = "nccl"
TRAINING_TIMEOUT = timedelta(minutes=30)
"""Timeout of the default group's collectives (DDP's gradient all-reduces): room for rank 0 to write a
checkpoint to a slow shared file system between epochs while the others wait in the next all-reduce."""
MAIN_ONLY_TIMEOUT = timedelta(hours=12)
"""How long the other ranks wait while rank 0 alone preprocesses and checks the cache."""
WAIT_MINUTES_ENV = "COV3D_DDP_WAIT_MINUTES"
"""Environment variable that overrides ``MAIN_ONLY_TIMEOUT`` (in minutes)."""

_host_group: Any = None  # the gloo group for coordination (see the module docstring), while DDP runs



def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


@dataclass(frozen=True)
class Distributed:
    """This process's place among the torchrun processes (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Distributed()


def distributed_from_env() -> Distributed:
    """Read torchrun's RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE (processes on this node)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return Distributed(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
    )


def main_only_timeout() -> timedelta:
    """``MAIN_ONLY_TIMEOUT``, or ``$COV3D_DDP_WAIT_MINUTES`` minutes."""
    minutes = os.environ.get(WAIT_MINUTES_ENV)
    return timedelta(minutes=float(minutes)) if minutes else MAIN_ONLY_TIMEOUT


def start_distributed(dist: Distributed, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group (nccl on GPUs, gloo on CPUs) unless the caller already did.

    Returns this process's device (cuda:LOCAL_RANK on GPUs) and whether the group was started here.
    """
    if not dist.enabled:
        return device, False
    global _host_group
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    started = not torch_dist.is_initialized()
    if started:
        torch_dist.init_process_group(backend=CUDA_BACKEND if device.type == "cuda" else CPU_BACKEND,
                                      init_method="env://", timeout=TRAINING_TIMEOUT)
    _host_group = torch_dist.new_group(backend=CPU_BACKEND, timeout=main_only_timeout())
    return device, started


def stop_distributed(started: bool) -> None:
    """Leave the process group if `start_distributed` started it."""
    global _host_group
    if _host_group is not None and torch_dist.is_initialized():
        torch_dist.destroy_process_group(_host_group)
    _host_group = None
    if started and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Distributed) -> None:
    """Wait for every process, on the host group (no NCCL timeout while one process works alone)."""
    if dist.enabled:
        torch_dist.barrier(group=_host_group)


def run_on_main(dist: Distributed, work: Callable[[], T]) -> T:
    """Run `work` in the main process only and give every process its result (e.g. filling and checking a
    shared cache once: the others neither repeat the check nor time out while they wait)."""
    if not dist.enabled:
        return work()
    result = [work() if dist.is_main else None]
    torch_dist.broadcast_object_list(result, src=0, group=_host_group)
    return result[0]


def gather_objects(dist: Distributed, value: T) -> list[T]:
    """`value` (picklable) from every process, in rank order (just [value] without DDP)."""
    if not dist.enabled:
        return [value]
    values: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(values, value, group=_host_group)
    return values


def gather_batches(dist: Distributed, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every process's per-batch tensors, on the CPU, in the order of the unsharded loader: process r ran
    the batches r, r + W, r + 2W, ... of W processes (``ShardedValidDL``)."""
    per_rank = gather_objects(dist, [batch.cpu() for batch in batches])
    rounds = max(len(shard) for shard in per_rank)
    return [shard[k] for k in range(rounds) for shard in per_rank if k < len(shard)]


def replica_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s own draws (dropout, reflections, loader workers): `seed` itself on rank 0,
    as in a single process, and independent streams from NumPy's ``SeedSequence`` on the other ranks."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence(seed % 2**63, spawn_key=(rank,)).generate_state(1, dtype=np.uint64)[0] % 2**63)


def seed_replica(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) with ``replica_seed(seed, rank)``."""
    own = replica_seed(seed, rank)
    random.seed(own)
    np.random.seed(own % 2**32)
    torch.manual_seed(own)


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state-dict order: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_strings(dist: Distributed, value: str) -> list[str]:
    """`value` from every process, in rank order (just [value] without DDP)."""
    return [str(v) for v in gather_objects(dist, value)]


class ShardedDL(TfmdDL):
    """A training loader that gives each process every `world_size`-th item of the shuffled order.

    Every process builds its loader from the same seed, so the shuffled orders agree without
    communication; the order is padded by repetition to a multiple of `world_size` so that every
    process runs the same number of batches (DDP needs that).
    """

    def __init__(self, dataset=None, rank: int = 0, world_size: int = 1, **kwargs):
        self.rank, self.world_size = rank, world_size
        super().__init__(dataset, **kwargs)

    def shard_size(self) -> int:
        return -(-self.n // self.world_size)

    def __len__(self) -> int:
        items = self.shard_size()
        return items // self.bs + (0 if self.drop_last or items % self.bs == 0 else 1)

    def get_idxs(self) -> list[int]:
        order = list(super().get_idxs())
        padded = (order * self.world_size)[: self.shard_size() * self.world_size]
        return padded[self.rank :: self.world_size]


class ShardedValidDL(TfmdDL):
    """A validation loader that gives process r the whole batches r, r + W, r + 2W, ... of the unshuffled
    order (W processes): the batches, and so each batch's loss, are those of a single process, no item is
    repeated or padded, and processes may run different numbers of batches (no collective runs per batch)."""

    def __init__(self, dataset=None, rank: int = 0, world_size: int = 1, **kwargs):
        self.rank, self.world_size = rank, world_size
        super().__init__(dataset, **kwargs)

    def batch_starts(self) -> range:
        """Index in the unsharded order of the first item of each of this process's batches."""
        return range(self.rank * self.bs, self.n, self.bs * self.world_size)

    def __len__(self) -> int:
        return len(self.batch_starts())

    @property
    def global_batches(self) -> int:
        """Batches of the unsharded loader."""
        return -(-self.n // self.bs)

    def global_batch(self, batch: int) -> int:
        """The index in the unsharded loader of this process's 0-based `batch`."""
        return batch * self.world_size + self.rank

    def get_idxs(self) -> list[int]:
        order = list(super().get_idxs())
        return [index for start in self.batch_starts() for index in order[start:start + self.bs]]


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (batch-norm running statistics, which each process updates
    from its own training batches), so that all validate the same model."""
    for buffer in unwrap(model).buffers():
        torch_dist.broadcast(buffer, src=0)


class DDPTrainer(Callback):
    """Wrap the model in DistributedDataParallel for the fit (after fastai moved it to the device); validate
    with the bare model and rank 0's buffers, so that a validation pass runs no collective per batch."""

    order = 11  # after TrainEvalCallback's before_fit (model on its device) and PlainBatches (channels-last)

    def __init__(self, device: torch.device):
        self.device = device

    def before_fit(self) -> None:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.learn.model = DistributedDataParallel(self.model, device_ids=device_ids)

    def before_validate(self) -> None:
        self.wrapped = self.model
        broadcast_buffers(self.wrapped)
        self.learn.model = unwrap(self.wrapped)

    def after_validate(self) -> None:
        self.learn.model = self.wrapped

    def after_fit(self) -> None:
        self.learn.model = unwrap(self.model)
