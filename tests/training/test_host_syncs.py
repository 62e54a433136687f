"""Host waits in a training step, counted: every read of a tensor's value by the host (``.item()``,
``.tolist()``, ``bool()``, ``float()``, ``.cpu()``, ...) waits for the GPU's queue on CUDA. On this CPU a
``TorchFunctionMode`` counts those calls between the first callback's ``before_batch`` and the last one's
``after_batch``, with the trainer's loss, finite guard, loss averages, 1cycle schedule, optimiser and
cluster log on a toy model (where CUDA exists, ``torch.cuda.set_sync_debug_mode`` does the same job)."""

import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from fastai.callback import schedule
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch.overrides import TorchFunctionMode
from torch.utils.data import TensorDataset

from cov3d.model.loss import Cov3dLoss
from cov3d.model.metrics import task_metrics
from cov3d.settings import TrainSettings
from cov3d.training.callbacks import FiniteGuard, OneCycleSchedule
from cov3d.training.distributed import SINGLE_PROCESS
from cov3d.training.optimizer import optimizer_function
from cov3d.training.progress import EpochLines
from cov3d.training.validation import record_on_device

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__format__", "__repr__"}
TRAIN_BATCHES = 4


HOST_ONLY_CODE = (str(Path(schedule.__file__)),)
"""Code whose tensors are CPU tensors by construction, on every device: fastai's 1cycle positions."""


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values per training step while ``in_step`` is set (not those of ``HOST_ONLY_CODE``)."""

    def __init__(self):
        super().__init__()
        self.in_step, self.steps, self.names = False, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.in_step and name in HOST_READS and sys._getframe(1).f_code.co_filename not in HOST_ONLY_CODE:
            self.steps[-1] += 1
            self.names.append(name)
        return func(*args, **(kwargs or {}))


class StepStart(Callback):
    order = -100

    def __init__(self, reads: HostReads):
        self.reads = reads

    def before_batch(self) -> None:
        if self.training:
            self.reads.in_step = True
            self.reads.steps.append(0)


class StepEnd(Callback):
    order = 1000

    def __init__(self, reads: HostReads):
        self.reads = reads

    def after_batch(self) -> None:
        self.reads.in_step = False


def toy_data() -> DataLoaders:
    """Batches of 2 scans: 5 features -> 6 logits; targets (has_covid, severity) of every kind."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([[0, 0], [1, 2], [1, 0], [1, 4], [0, 0], [1, 1], [1, 3], [0, 0]], dtype=torch.float32)
    train = TensorDataset(torch.randn(2 * TRAIN_BATCHES, 5, generator=generator), targets)
    valid = TensorDataset(torch.randn(4, 5, generator=generator), targets[:4])
    return DataLoaders.from_dsets(train, valid, bs=2, shuffle=False, device="cpu")


def count_host_reads(trainer_averages: bool) -> HostReads:
    """Fit 2 epochs with the trainer's callbacks; fastai's own Recorder averages unless `trainer_averages`."""
    model = torch.nn.Linear(5, 6)
    settings = TrainSettings(epochs=2, learning_rate=1e-3)
    reads = HostReads()
    guard = FiniteGuard(run_dir=Path("."), epochs=2, first_epoch=0, precision="fp32", learning_rate=1e-3)
    learner = Learner(toy_data(), model, loss_func=Cov3dLoss(severity_factor=0.5), metrics=task_metrics(0.5),
                      opt_func=optimizer_function(settings.optimizer, model, settings.weight_decay), wd=None,
                      cbs=[OneCycleSchedule(settings), guard, StepStart(reads), StepEnd(reads)])
    learner.remove_cb(ProgressCallback)
    learner.add_cb(EpochLines(0, 2))
    if trainer_averages:
        record_on_device(learner, SINGLE_PROCESS, torch.device("cpu"))
    with redirect_stdout(io.StringIO()), reads:
        learner.fit(2, lr=1e-3, wd=None)
    return reads


def test_a_training_step_reads_the_host_once():
    reads = count_host_reads(trainer_averages=True)
    assert reads.steps == [1] * (2 * TRAIN_BATCHES), reads.names
    assert set(reads.names) == {"__bool__"}  # the finite guard's one check of loss and gradients


def test_fastais_recorder_reads_the_host_at_every_step():
    """The count can fail: fastai's averages copy every batch's loss to the host (``to_detach``)."""
    reads = count_host_reads(trainer_averages=False)
    assert all(count >= 2 for count in reads.steps), reads.names
    assert "cpu" in reads.names


@pytest.mark.parametrize("bad", [[[2, 0]], [[1, 5]], [[0, 3]], [[1, -1]]])
def test_the_loss_still_refuses_bad_targets(bad):
    """One device-side check replaces the loss's host checks: it raises at once on a CPU."""
    loss = Cov3dLoss(severity_factor=0.5)
    with pytest.raises(RuntimeError, match="has_covid must be 0 or 1"):
        loss(torch.zeros(1, 6), torch.tensor(bad, dtype=torch.float32))


class NaNForValidationItem(torch.nn.Module):
    """A linear layer whose validation output is NaN for the scan whose first feature is 99."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(5, 6)

    def forward(self, x):
        out = self.linear(x)
        return out if self.training else torch.where((x[:, :1] == 99), torch.nan, out)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_non_finite_validation_loss_is_reported_after_the_pass_with_its_batch(rank):
    """Read once after the pass; a sharded loader gives the batch's number in the whole validation set."""
    from fastai.data.core import TfmdDL

    from cov3d.errors import NonFiniteTraining
    from cov3d.training.distributed import ShardedValidDL

    valid = [(torch.full((5,), 99.0 if index == 4 + 2 * rank else 0.0), torch.tensor([0.0, 0.0])) for index in range(8)]
    loader = TfmdDL(valid, bs=2).new(cls=ShardedValidDL, rank=rank, world_size=2)  # rank 0: batches 0, 2; rank 1: 1, 3
    learner = Learner(DataLoaders(toy_data().train, loader), NaNForValidationItem(), loss_func=Cov3dLoss(severity_factor=0.5),
                      cbs=[FiniteGuard(run_dir=Path("."), epochs=3, first_epoch=1, precision="fp32", learning_rate=1e-3)])
    learner.remove_cb(ProgressCallback)
    with redirect_stdout(io.StringIO()), pytest.raises(NonFiniteTraining) as raised:
        learner.fit(1, lr=1e-3)
    error = raised.value
    # the NaN scan is item 4 (rank 0's second batch, batch 3 of 4) or item 6 (rank 1's second, batch 4 of 4)
    assert (error.what, error.epoch, error.batch, error.batches) == ("validation loss", 2, 3 + rank, 4)
