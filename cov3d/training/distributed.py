"""Data-parallel training with PyTorch DDP, launched by `torchrun` (one process per GPU, or CPU processes).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT) for every process; without them
training runs in a single process. Each process trains on its own shard of every epoch's shuffled
training order, DDP averages the gradients, and every process validates the whole validation set
(identical weights give identical metrics). Only the main process (rank 0) writes files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from fastai.callback.core import Callback
from fastai.data.core import TfmdDL
from torch.nn.parallel import DistributedDataParallel

from cov3d.training.checkpoint import unwrap

T = TypeVar("T")
CPU_BACKEND = "gloo"
CUDA_BACKEND = "nccl"


@dataclass(frozen=True)
class Distributed:
    """This process's place among the torchrun processes (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """Read torchrun's RANK, LOCAL_RANK and WORLD_SIZE environment variables."""
    return Distributed(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def start_distributed(dist: Distributed, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group (nccl on GPUs, gloo on CPUs) unless the caller already did.

    Returns this process's device (cuda:LOCAL_RANK on GPUs) and whether the group was started here.
    """
    if not dist.enabled:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if torch_dist.is_initialized():
        return device, False
    torch_dist.init_process_group(backend=CUDA_BACKEND if device.type == "cuda" else CPU_BACKEND, init_method="env://")
    return device, True


def stop_distributed(started: bool) -> None:
    """Leave the process group if `start_distributed` started it."""
    if started and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Distributed) -> None:
    if dist.enabled:
        torch_dist.barrier()


def main_first(dist: Distributed, work: Callable[[], T]) -> T:
    """Run `work` in the main process, then in the others (e.g. filling a shared cache once)."""
    if dist.is_main:
        result = work()
        barrier(dist)
        return result
    barrier(dist)
    return work()


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state-dict order: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_strings(dist: Distributed, value: str) -> list[str]:
    """`value` from every process, in rank order (just [value] without DDP)."""
    if not dist.enabled:
        return [value]
    values: list[str | None] = [None] * dist.world_size
    torch_dist.all_gather_object(values, value)
    return [str(v) for v in values]


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


class DDPTrainer(Callback):
    """Wrap the model in DistributedDataParallel for the fit (after fastai moved it to the device)."""

    order = 11  # after TrainEvalCallback's before_fit (model on its device) and PlainBatches (channels-last)

    def __init__(self, device: torch.device):
        self.device = device

    def before_fit(self) -> None:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.learn.model = DistributedDataParallel(self.model, device_ids=device_ids)

    def after_fit(self) -> None:
        self.learn.model = unwrap(self.model)
