"""Run by tests/training/test_ddp_validation.py under torchrun (2 gloo processes) on a toy model; writes
``rank<r>.json`` (and rank 0's final weights) into the folder given as its argument.

Two fits of one epoch from the same weights: ``fastai`` with fastai's own Recorder and every process
validating the whole set, ``sharded`` with the trainer's device-side averages and sharded validation.
Also the shared-folder check, with a folder all processes share and one that rank 1 does not see, the
check that every process reads the bytes rank 0 wrote, and
a validation pass with a NaN loss in one process's shard, which must stop every process alike.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders, TfmdDL
from fastai.learner import Learner
from fastcore.basics import noop
from torch import nn

from cov3d.errors import Cov3dError
from cov3d.model.loss import Cov3dLoss
from cov3d.model.metrics import task_metrics
from cov3d.training.distributed import (
    DDPTrainer,
    ShardedDL,
    ShardedValidDL,
    distributed_from_env,
    run_on_main,
    start_distributed,
    stop_distributed,
)
from cov3d.training.launch import SHARED_TOKEN_FILE, check_same_files, check_shared_folders
from cov3d.training.run_figures import validation_logits
from cov3d.training.validation import record_on_device

FEATURES, TRAIN_ITEMS, VALID_ITEMS, BATCH = 4, 8, 9, 2  # 9 validation items: 5 batches, the last of one item
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_gather_object", "broadcast_object_list", "barrier")


def items(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (x, target) pairs: x (FEATURES,) whose first value is the item's index, target (2,) =
    [has_covid, severity] with negatives at severity 0 and one positive without a grade."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index in range(count):
        x = torch.randn(FEATURES, generator=generator)
        x[0] = index
        positive = index % 3 != 0
        severity = (index % 4) + 1 if positive and index != 1 else 0
        pairs.append((x, torch.tensor([float(positive), float(severity)])))
    return pairs


def toy_model() -> nn.Module:
    """A linear layer, batch norm (buffers that each process updates) and a linear head of 6 logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6))


def toy_loss() -> Cov3dLoss:
    return Cov3dLoss(severity_factor=0.5, presence_weights=[1.0, 2.0], severity_weights=[1.0, 0.5, 1.5, 1.0, 2.0, 1.0])


def valid_loader() -> TfmdDL:
    return TfmdDL(items(VALID_ITEMS, seed=1), bs=BATCH)


def reference_learner(model: nn.Module) -> Learner:
    """One process, fastai's own Recorder, the whole validation set: the reference scores."""
    dls = DataLoaders(TfmdDL(items(TRAIN_ITEMS, seed=0), bs=BATCH), valid_loader())
    return quiet(Learner(dls, model, loss_func=toy_loss(), metrics=task_metrics(0.5)))


def quiet(learner: Learner) -> Learner:
    """`learner` without progress bars and printed rows."""
    learner.remove_cb(ProgressCallback)
    learner.logger = noop
    return learner


class InBatch(Callback):
    """Counts the Python-level collectives called inside and outside batches (from the first callback's
    ``before_batch`` to the last one's ``after_batch``, ``BatchEnd``), and the items each process validates."""

    order = -100

    def __init__(self):
        self.inside, self.calls, self.valid_items = False, {"in_batch": 0, "outside": 0}, []
        for name in COLLECTIVES:
            original = getattr(torch_dist, name)

            def counted(*args, _original=original, **kwargs):
                self.calls["in_batch" if self.inside else "outside"] += 1
                return _original(*args, **kwargs)

            setattr(torch_dist, name, counted)

    def before_batch(self) -> None:
        self.inside = True
        if not self.training:
            self.valid_items += self.xb[0][:, 0].long().tolist()


class BatchEnd(Callback):
    order = 1000

    def __init__(self, watch: InBatch):
        self.watch = watch

    def after_batch(self) -> None:
        self.watch.inside = False


def fit(variant: str, dist, device: torch.device) -> tuple[dict, Learner]:
    torch.manual_seed(1)
    random.seed(1)  # the loaders' shuffling
    train = TfmdDL(items(TRAIN_ITEMS, seed=0), bs=BATCH, shuffle=True).new(
        cls=ShardedDL, rank=dist.rank, world_size=dist.world_size)
    valid = valid_loader()
    if variant == "sharded":
        valid = valid.new(cls=ShardedValidDL, rank=dist.rank, world_size=dist.world_size)
    watch = InBatch()
    learner = quiet(Learner(DataLoaders(train, valid), toy_model(), loss_func=toy_loss(), metrics=task_metrics(0.5),
                            cbs=[DDPTrainer(device), watch, BatchEnd(watch)]))
    if variant == "sharded":
        record_on_device(learner, dist, device)
    learner.fit(1, lr=1e-2)
    for name in COLLECTIVES:  # undo the counting wrappers
        setattr(torch_dist, name, getattr(torch_dist, name).__kwdefaults__["_original"])
    names = learner.recorder.metric_names[1:-1]
    return {"values": dict(zip(names, map(float, learner.recorder.values[-1]))), "collectives": watch.calls,
            "valid_items": watch.valid_items, "valid_batches": len(valid),
            "buffers": [b.tolist() for b in learner.model.buffers() if b.is_floating_point()]}, learner


def shared_folders(dist, out: Path) -> dict:
    results = {}
    check_shared_folders(dist, {"run folder": out / "shared"})
    results["shared_token_left"] = (out / "shared" / SHARED_TOKEN_FILE).exists()
    own = out / f"node{dist.rank}"  # a relative folder name means another folder on each "node"
    own.mkdir(exist_ok=True)
    os.chdir(own)
    try:
        check_shared_folders(dist, {"run folder": Path("run")})
        results["unshared_error"] = None
    except Cov3dError as error:
        results["unshared_error"] = str(error)
    shared = out / "shared" / "best.safetensors"
    run_on_main(dist, lambda: shared.write_bytes(b"kept weights"))
    check_same_files(dist, [shared, out / "shared" / "absent"], "remedy.")  # the same bytes, or no file, everywhere
    Path("best.safetensors").write_bytes(f"written by rank {dist.rank}".encode())  # in each process's own folder
    try:
        check_same_files(dist, [shared, Path("best.safetensors")], "remedy.")
        results["other_bytes_error"] = None
    except Cov3dError as error:
        results["other_bytes_error"] = str(error)
    if dist.is_main:
        Path("rank0-only.safetensors").write_bytes(b"kept weights")
    try:
        check_same_files(dist, [Path("rank0-only.safetensors")], "remedy.")
        results["unseen_error"] = None
    except Cov3dError as error:
        results["unseen_error"] = str(error)
    return results


class NaNForItem(nn.Module):
    """The toy model, whose validation output is NaN for the item whose first feature (its index) is 6."""

    def __init__(self):
        super().__init__()
        self.model = toy_model()

    def forward(self, x):
        out = self.model(x)
        return out if self.training else torch.where(x[:, :1] == 6, torch.nan, out)


def non_finite_validation(dist, device: torch.device) -> list:
    """The error of a sharded fit whose validation item 6 (global batch 4 of 5, rank 1's second) is NaN:
    [what, batch, batches] as every process raises it (None if it did not)."""
    from cov3d.errors import NonFiniteTraining
    from cov3d.training.callbacks import FiniteGuard

    train = TfmdDL(items(TRAIN_ITEMS, seed=0), bs=BATCH).new(cls=ShardedDL, rank=dist.rank, world_size=dist.world_size)
    valid = valid_loader().new(cls=ShardedValidDL, rank=dist.rank, world_size=dist.world_size)
    guard = FiniteGuard(run_dir=Path("."), epochs=1, first_epoch=0, precision="fp32", learning_rate=1e-2)
    learner = record_on_device(quiet(Learner(DataLoaders(train, valid), NaNForItem(), loss_func=toy_loss(),
                                             cbs=[DDPTrainer(device), guard])), dist, device)
    try:
        learner.fit(1, lr=1e-2)
    except NonFiniteTraining as error:
        return [error.what, error.batch, error.batches]
    return None


def main(out: Path) -> None:
    dist = distributed_from_env()
    device, started = start_distributed(dist, torch.device("cpu"))
    try:
        result = {}
        result["fastai"], _ = fit("fastai", dist, device)
        result["sharded"], learner = fit("sharded", dist, device)
        if dist.is_main:
            torch.save(learner.model.state_dict(), out / "weights.pt")
        sharded = valid_loader().new(cls=ShardedValidDL, rank=dist.rank, world_size=dist.world_size)
        logits, targets = validation_logits(learner.model, sharded, device, None, dist)
        result["gathered_targets"] = targets.tolist()
        result["gathered_logits"] = logits.tolist()
        result.update(shared_folders(dist, out))
        result["non_finite_validation"] = non_finite_validation(dist, device)
        (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    finally:
        stop_distributed(started)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
