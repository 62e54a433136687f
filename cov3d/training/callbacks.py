"""Training-loop callbacks that know the run's absolute epoch, so a resumed run continues exactly.

fastai's `fit_one_cycle(start_epoch=...)` skips epochs by cancelling them, which still runs every
callback's `after_epoch` (its CSVLogger would write rows for the skipped epochs) and derives the
schedule position from an accumulated float. Here the remaining epochs are fitted with `Learner.fit`
and these callbacks add `first_epoch` themselves.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos

from cov3d.atomic import write_text_atomically
from cov3d.errors import NonFiniteTraining
from cov3d.runfiles import CONFIG_FILE, RESUME_FILE
from cov3d.settings import TrainSettings
from cov3d.training.checkpoint import resume_remedy
from cov3d.training.distributed import unwrap
from cov3d.training.runconfig import NEW_RUN_REMEDY, read_run_config

WANDB_PROJECT = "cov3d"
WANDB_ID_BYTES = 4  # run ids of 8 hex characters, kept in config.json so that a resumed run logs to the same W&B run


class OneCycleSchedule(Callback):
    """fastai's 1cycle policy for lr and momentum (as in `fit_one_cycle`), positioned by the absolute batch,
    with the run's schedule settings (``TrainSettings``: learning_rate, epochs, pct_start, div_factor,
    final_div_factor, momentums).

    The position of batch `i` of epoch `e` in a run of `E` epochs of `n` batches is (e·n + i) / (E·n),
    computed the same way whether the run was interrupted or not.
    """

    order, run_valid = 60, False  # fastai's ParamScheduler slot

    def __init__(self, settings: TrainSettings, first_epoch: int = 0):
        self.epochs, self.first_epoch = settings.epochs, first_epoch
        lr_max = settings.learning_rate
        self.schedules = {
            "lr": combined_cos(settings.pct_start, lr_max / settings.div_factor, lr_max, lr_max / settings.final_div_factor),
            "mom": combined_cos(settings.pct_start, *settings.momentums),
        }

    def position(self) -> float:
        """Fraction of the whole run's training batches done before this batch, in [0, 1)."""
        return ((self.first_epoch + self.epoch) * self.n_iter + self.iter) / (self.epochs * self.n_iter)

    def before_batch(self) -> None:
        position = self.position()
        for name, schedule in self.schedules.items():
            self.opt.set_hyper(name, float(schedule(position)))


class MetricsLog(Callback):
    """metrics.csv: the Recorder's row for each epoch (epoch, losses, metrics, time), written by one process.

    A resumed run keeps the header and the rows of the epochs before `first_epoch` and drops any
    row written after the last checkpoint.
    """

    order = 65  # after the Recorder (50) has completed the epoch's row

    def __init__(self, path: Path, first_epoch: int = 0, write: bool = True):
        self.path, self.first_epoch, self.write = Path(path), first_epoch, write

    def before_fit(self) -> None:
        if not self.write:
            return
        header = ",".join(self.recorder.metric_names)
        kept = self.path.read_text().splitlines()[1:1 + self.first_epoch] if self.first_epoch else []
        write_text_atomically(self.path, "\n".join([header, *kept]) + "\n", resume_remedy(self.path.parent))

    def after_epoch(self) -> None:
        if not self.write:
            return
        row = [self.first_epoch + self.epoch, *self.recorder.log[1:]]
        text = self.path.read_text() + ",".join(str(value) for value in row) + "\n"
        write_text_atomically(self.path, text, resume_remedy(self.path.parent))


class WandbLog(Callback):
    """Log each epoch's losses and metrics, and the lr and momentum it ended with, to the current W&B run.

    The W&B step is the absolute epoch, so a resumed run continues its history. (fastai's
    WandbCallback is not used: collecting its config fails on callbacks that take lists of names.)
    """

    order = 66  # after the Recorder (50) has completed the epoch's row

    def __init__(self, first_epoch: int = 0):
        self.first_epoch = first_epoch

    def after_epoch(self) -> None:
        import wandb

        epoch = self.first_epoch + self.epoch
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = {name: float(value) for name, value in zip(names, self.recorder.log[1:])}
        hypers = {name: float(self.opt.hypers[-1][name]) for name in ("lr", "mom")}
        wandb.log({"epoch": epoch, **values, **hypers}, step=epoch)


class FiniteGuard(Callback):
    """Stop training at the first loss or gradient that is not finite, before the optimiser applies it.

    A training step waits on the host once: the loss and, unless a gradient scaler is in charge of them
    (fp16 on CUDA skips overflowing steps itself), every gradient are checked together after the
    backward pass, with one fused max-norm over the gradients (an infinite or NaN element gives an
    infinite or NaN norm). Validation losses are checked once, at the end of the validation pass (under
    DDP with one collective, so that every process stops with the first failed batch of any shard).
    In training no collective is needed: a non-finite loss on one rank makes the averaged gradients
    non-finite on every rank, so all ranks stop at the same batch (fp16 leaves the check to the rank
    whose loss failed; torchrun then stops the others). The error names the epoch and batch; the
    end-of-epoch checkpoint and best weights written before it are left as they were.
    """

    order = 1  # before any callback that acts on the step

    def __init__(self, *, run_dir: Path, epochs: int, first_epoch: int, precision: str, learning_rate: float,
                 check_gradients: bool = True):
        self.run_dir, self.epochs, self.first_epoch = Path(run_dir), epochs, first_epoch
        self.precision, self.learning_rate = precision, learning_rate
        self.check_gradients = check_gradients

    def before_validate(self) -> None:
        self.valid_finite: list[torch.Tensor] = []

    def after_loss(self) -> None:
        finite = torch.isfinite(self.learn.loss.detach()).all()
        if not self.training:
            self.valid_finite.append(finite)  # read once, after the pass
        elif self.check_gradients:
            self.loss_finite = finite  # read with the gradients
        elif not bool(finite):
            self.stop("training loss")

    def after_backward(self) -> None:
        if not self.check_gradients:
            return
        named = [(name, p.grad) for name, p in unwrap(self.learn.model).named_parameters() if p.grad is not None]
        norms = torch._foreach_norm([grad for _, grad in named], float("inf")) if named else []
        finite = self.loss_finite & torch.isfinite(torch.stack(norms)).all() if norms else self.loss_finite
        if bool(finite):
            return  # the step's one host wait
        if not bool(self.loss_finite):
            self.stop("training loss")
        self.stop("gradient of " + next(name for name, grad in named if not bool(torch.isfinite(grad).all())))

    def after_validate(self) -> None:
        batches = getattr(self.dl, "global_batches", self.n_iter)
        failed = torch.stack(self.valid_finite).logical_not().nonzero() if self.valid_finite else torch.empty(0, 1)
        first = int(failed[0, 0]) if len(failed) else None
        shard = getattr(self.dl, "global_batch", None)  # a sharded validation loader numbers its batches globally
        first = shard(first) if shard and first is not None else first
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            # one collective a pass, so that every process stops at the first failed batch of any of them
            device = next(unwrap(self.learn.model).parameters()).device
            earliest = torch.tensor(batches if first is None else first, device=device)
            torch_dist.all_reduce(earliest, op=torch_dist.ReduceOp.MIN)
            first = None if int(earliest) >= batches else int(earliest)
        if first is not None:
            self.stop("validation loss", batch=first, batches=batches)

    def stop(self, what: str, batch: int | None = None, batches: int | None = None) -> None:
        """Raise ``NonFiniteTraining`` for the current batch (or 0-based `batch` of `batches`)."""
        epoch = self.first_epoch + self.epoch
        raise NonFiniteTraining(
            what=what, epoch=epoch + 1, epochs=self.epochs, batch=(self.iter if batch is None else batch) + 1,
            batches=self.n_iter if batches is None else batches,
            precision=self.precision, learning_rate=self.learning_rate,
            resumable_epoch=epoch if epoch > 0 and (self.run_dir / RESUME_FILE).is_file() else None,
            run_dir=str(self.run_dir),
        )


TIMED_STEPS = 8
"""Training steps timed after the first (which also runs bf16 kernel probes and warms caches)."""
FORWARD_SHARE = 1 / 3
"""A validation batch (forward pass only) costs about a third of a training step (forward and backward)."""


class StepTimer(Callback):
    """Times the first training steps of a fit and announces how long the whole fit will take; after the
    first epoch, announces again from that epoch's time.

    The first step is left out (kernel probes, allocator warm-up); the next ``TIMED_STEPS`` (fewer in
    a short epoch) give the seconds a step, data loading included. That estimate counts every training
    step, each validation batch at ``FORWARD_SHARE`` of a step, and the ``evaluation_passes`` over the
    validation batches after the fit at the same share. A few steps are a small sample (the demo held
    to AVX2: 0.70 s a step over steps 2-8 in one run against 0.82 s over its epochs, 1.01 s in
    another), so the second announcement takes the first epoch's time as it was from its second step
    on (its validation and checkpoints included; the first step counted as one measured step) for each
    epoch left, and its validation's time for each evaluation pass. ``announce`` gets the measurement
    as a dict, the second time with ``first_epoch_seconds`` and ``minutes_left`` added (logged and
    recorded in config.json by the trainer).
    """

    order, run_valid = 5, False

    def __init__(self, announce, shape: str, machine: str, precision: str, evaluation_passes: int = 0):
        self.announce, self.shape, self.machine, self.precision = announce, shape, machine, precision
        self.evaluation_passes = evaluation_passes
        self.starts: list[float] = []
        """Start times of the first epoch's steps 1 to ``TIMED_STEPS + 1``, then the end of the last."""
        self.speed: dict | None = None
        self.epoch_start = self.validation_start = self.validation_seconds = 0.0

    def before_epoch(self) -> None:
        if self.epoch == 0:
            self.epoch_start = time.perf_counter()
        elif self.epoch == 1 and self.speed is not None:
            step = self.speed["seconds_per_step"]
            since = self.starts[1] - step if len(self.starts) > 1 else self.epoch_start
            epoch_seconds = time.perf_counter() - since
            seconds = (self.n_epoch - 1) * epoch_seconds + self.evaluation_passes * self.validation_seconds
            self.announce({**self.speed, "first_epoch_seconds": round(epoch_seconds, 1),
                           "minutes_left": round(seconds / 60, 1)})

    def before_batch(self) -> None:
        if self.epoch == 0 and len(self.starts) <= TIMED_STEPS:
            self.starts.append(time.perf_counter())

    def after_batch(self) -> None:
        if self.epoch == 0 and len(self.starts) == TIMED_STEPS + 1:
            self.starts.append(time.perf_counter())
            self.finish()

    def before_validate(self) -> None:
        if self.epoch == 0:
            self.validation_start = time.perf_counter()
            if self.speed is None:
                self.starts.append(self.validation_start)
                self.finish()

    def after_validate(self) -> None:
        if self.epoch == 0:
            self.validation_seconds = time.perf_counter() - self.validation_start

    def finish(self) -> None:
        steps = self.starts[1:] if len(self.starts) > 2 else self.starts
        step = (steps[-1] - steps[0]) / max(1, len(steps) - 1)
        validation = len(self.dls.valid) * step * FORWARD_SHARE
        seconds = self.n_epoch * (self.n_iter * step + validation) + self.evaluation_passes * validation
        self.speed = {
            "machine": self.machine, "precision": self.precision, "seconds_per_step": round(step, 3),
            "steps_per_epoch": self.n_iter, "epochs": self.n_epoch, "shape": self.shape,
            "evaluation_passes": self.evaluation_passes, "estimated_minutes": round(seconds / 60, 1),
        }
        self.announce(self.speed)


def speed_line(speed: dict) -> str:
    """'Speed on CPU ...: bf16, about 0.71 s a training step: 11 epochs of 48 steps at 16x48x48 take about
    7.0 min with validation and the final evaluation.' from a ``StepTimer`` measurement; after the first
    epoch, 'The first epoch took 45 s: the 10 left and the final evaluation take about 7.8 min.'"""
    if "minutes_left" in speed:
        return (f"The first epoch took {speed['first_epoch_seconds']:.0f} s: the {speed['epochs'] - 1} left and the "
                f"final evaluation take about {speed['minutes_left']:.1f} min.")
    return (f"Speed on {speed['machine']}: {speed['precision']}, about {speed['seconds_per_step']:.2f} s a training "
            f"step: {speed['epochs']} epoch{'s' if speed['epochs'] != 1 else ''} of {speed['steps_per_epoch']} steps at {speed['shape']} take about "
            f"{speed['estimated_minutes']:.1f} min with validation and the final evaluation.")


def record_in_config(run_dir: Path, key: str, value) -> None:
    """Add ``key`` to the run's config.json (read back, extended, written atomically)."""
    config = read_run_config(run_dir)
    write_text_atomically(run_dir / CONFIG_FILE, json.dumps({**config, key: value}, indent=2), NEW_RUN_REMEDY)


def start_wandb(run_dir: Path, *, resume: bool = False) -> None:
    """Start (or, resuming, continue) a Weights & Biases run whose config is the run's config.json.

    `WandbLog` then logs every epoch and `finish_wandb` the best scores. Honours WANDB_MODE=offline.
    """
    import wandb

    config = read_run_config(run_dir)
    run_id = config.get("wandb_id") or secrets.token_hex(WANDB_ID_BYTES)
    if "wandb_id" not in config:
        record_in_config(run_dir, "wandb_id", run_id)
    wandb.init(project=WANDB_PROJECT, dir=str(run_dir), id=run_id, name=run_dir.name, config=config,
               resume="allow" if resume else None, reinit=True)


def finish_wandb(best: dict[str, float], best_epochs: dict[str, int]) -> None:
    """Record the best scores and their epochs (metric name -> value) in the W&B run summary and close the run."""
    import wandb

    for name, value in best.items():
        wandb.run.summary[f"best_{name}"] = value
        wandb.run.summary[f"best_{name}_epoch"] = best_epochs[name]
    wandb.finish()
