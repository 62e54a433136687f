"""Loss averages that never wait on the host inside a step, and validation shared between DDP processes.

fastai's Recorder averages the losses with ``to_detach``, which at every batch all-gathers the loss
across the processes (a collective on the default group) and copies it to the host (a wait). Here the
running sums stay on the device (``DeviceSmoothLoss``, ``DeviceAvgLoss``) and ``ShardedValidation``
combines them across processes once per phase:

- the smoothed training loss (an exponential average, linear in the losses) is averaged over the
  processes after each training pass, which gives fastai's value, the average of the gathered losses;
- each process validates its own whole batches (``ShardedValidDL``); after the pass, the loss sums are
  added up across processes and the metrics' logits and targets gathered in the unsharded order, so
  that every process reports the scores one process would report for the whole validation set.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, AvgSmoothLoss, Learner
from fastai.torch_core import find_bs

from cov3d.model.metrics import EpochScore
from cov3d.training.distributed import Distributed, gather_batches


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed loss (``AvgSmoothLoss``, beta 0.98), kept on the loss's device, this process's own."""

    def accumulate(self, learn) -> None:
        loss = learn.loss.detach().mean().float()
        if self.val.device != loss.device:  # after a reset or a resumed checkpoint: once a fit
            self.val = self.val.to(loss.device)
        self.count += 1
        self.val = torch.lerp(loss, self.val, self.beta)


class DeviceAvgLoss(AvgLoss):
    """fastai's batch-size-weighted average loss (``AvgLoss``), summed on the loss's device, this process's own."""

    def accumulate(self, learn) -> None:
        batch = find_bs(learn.yb)
        self.total = self.total + learn.loss.detach().mean().float() * batch
        self.count += batch


class ShardedValidation(Callback):
    """Combine the processes' losses and validation predictions once per phase (see the module docstring).

    Without DDP it changes nothing but where the sums are kept.
    """

    order = 45  # before the Recorder (50) reads the values

    def __init__(self, dist: Distributed, device: torch.device):
        self.dist, self.device = dist, device

    def after_train(self) -> None:
        if not self.dist.enabled:
            return
        smooth = self.recorder.smooth_loss
        value = smooth.val.to(self.device)
        torch_dist.all_reduce(value)
        smooth.val = value / self.dist.world_size

    def after_validate(self) -> None:
        if not self.dist.enabled:
            return
        average = self.recorder.loss
        sums = torch.stack([torch.as_tensor(average.total, dtype=torch.float32, device=self.device).reshape(()),
                            torch.tensor(float(average.count), device=self.device)])
        torch_dist.all_reduce(sums)
        average.total, average.count = sums[0], int(sums[1])
        scores = [metric for metric in self.learn.metrics if isinstance(metric, EpochScore)]
        if scores:  # every EpochScore holds the same batches (learn.pred and learn.yb)
            logits, targets = gather_batches(self.dist, scores[0].logits), gather_batches(self.dist, scores[0].targets)
            for metric in scores:
                metric.logits, metric.targets = logits, targets


def record_on_device(learner: Learner, dist: Distributed, device: torch.device) -> Learner:
    """Give `learner`'s Recorder the device-side loss averages and add ``ShardedValidation``; returns it."""
    recorder = learner.recorder
    recorder.loss, recorder.smooth_loss = DeviceAvgLoss(), DeviceSmoothLoss(beta=recorder.smooth_loss.beta)
    learner.add_cb(ShardedValidation(dist, device))
    return learner
