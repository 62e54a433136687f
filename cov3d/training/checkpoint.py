"""Resumable training: an end-of-epoch checkpoint with everything needed to continue a run exactly,
and the weights kept at each monitored score's best epoch (``BestCheckpoints``).

``checkpoint.pth`` holds only tensors, lists, dicts, strings and numbers, so it loads with
``torch.load(weights_only=True)`` and never runs code from the file. It is replaced atomically
(write to a temporary file, then ``os.replace``): a run killed at any moment leaves either the
previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.optimizer import OptimWrapper
from safetensors.torch import save as safetensors_bytes

from cov3d.atomic import replaced_atomically, write_bytes_atomically
from cov3d.errors import Cov3dError
from cov3d.model.files import non_finite_tensor
from cov3d.model.metrics import task_metrics
from cov3d.recipes import ONE_CHECKPOINT
from cov3d.runfiles import RESUME_FILE, WEIGHTS_BY_METRIC
from cov3d.settings import TrainSettings
from cov3d.training.distributed import seed_replica, unwrap

CHECKPOINT_FORMAT = 1


def pack_python_state(state: tuple) -> dict[str, Any]:
    """A `random.getstate()` tuple as {version, state: int64 tensor (625,), gauss}."""
    version, internal, gauss = state
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def unpack_python_state(state: dict[str, Any]) -> tuple:
    """The inverse of `pack_python_state`, ready for `setstate`."""
    return state["version"], tuple(state["state"].tolist()), state["gauss"]


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if in use) current CUDA device generator states, as tensors and numbers."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": pack_python_state(random.getstate()),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured."""
    random.setstate(unpack_python_state(states["python"]))
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][0])


def optimizer_state(opt) -> dict[str, Any]:
    """The optimiser's state as plain lists and dicts, tensors on the CPU: torch's state dict under
    ``torch`` (fused AdamW in fastai's ``OptimWrapper``), else fastai's per-parameter tensors/steps
    (``state``) and per-group hypers (``hypers``)."""
    if isinstance(opt, OptimWrapper):
        state = opt.opt.state_dict()
        return {"torch": {
            "state": {index: {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                              for key, value in entry.items()} for index, entry in state["state"].items()},
            "param_groups": state["param_groups"],
        }}
    state = opt.state_dict()
    return {
        "state": [{key: value.detach().cpu() if isinstance(value, torch.Tensor) else value for key, value in dict(s).items()}
                  for s in state["state"]],
        "hypers": [{key: float(value) for key, value in dict(h).items()} for h in state["hypers"]],
    }


def state_like(value: Any, param: torch.Tensor) -> Any:
    """A saved optimiser-state value placed like its parameter: tensors on the parameter's device,
    floating-point ones also in its dtype (Adam's averages are made with ``zeros_like(grad)``)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=param.device, dtype=param.dtype)
    return value.to(param.device)


def load_optimizer_state(opt, state: dict[str, Any]) -> None:
    """Load `optimizer_state` output into the optimiser it came from, placing each tensor like its parameter.

    Call it once the model is where it trains (fastai moves it in place at the start of ``fit``):
    state loaded earlier would stay on the CPU while the gradients come from the GPU.
    """
    params = [p for p, *_ in opt.all_params()]
    saved = len(state["torch"]["state"]) if "torch" in state else len(state["state"])
    if ("torch" in state) != isinstance(opt, OptimWrapper) or saved > len(params):
        raise Cov3dError(f"The checkpoint's optimiser state ({saved} parameters) does not fit this run's optimiser "
                         f"({len(params)} parameters): it was written by another model; start a new run without --resume.")
    if isinstance(opt, OptimWrapper):
        opt.opt.load_state_dict(state["torch"])  # torch places each tensor like its parameter
        return
    if len(params) != len(state["state"]):
        raise Cov3dError(f"The checkpoint's optimiser state has {len(state['state'])} parameters, the model "
                         f"{len(params)}: it was written by another model; start a new run without --resume.")
    placed = [{key: state_like(value, param) for key, value in s.items()} for param, s in zip(params, state["state"])]
    opt.load_state_dict({"state": placed, "hypers": state["hypers"]})


def misplaced_optimizer_state(opt) -> list[str]:
    """Optimiser-state tensors that are not on their parameter's device (or, floating, in its dtype;
    torch keeps AdamW's step counts on the CPU unless the kernel is fused)."""
    states = opt.opt.state if isinstance(opt, OptimWrapper) else opt.state
    misplaced = []
    for index, (param, *_) in enumerate(opt.all_params()):
        for key, value in states.get(param, {}).items():
            if key == "step" and isinstance(opt, OptimWrapper) and value.device.type == "cpu":
                continue
            if isinstance(value, torch.Tensor) and (
                value.device != param.device or (value.is_floating_point() and value.dtype != param.dtype)
            ):
                misplaced.append(f"parameter {index} '{key}': {value.device}/{value.dtype}, "
                                 f"parameter {param.device}/{param.dtype}")
    return misplaced


def resume_remedy(run_dir: Path) -> str:
    """What to do when a file of the run in `run_dir` cannot be written (a full disk, say)."""
    if (Path(run_dir) / RESUME_FILE).is_file():
        return f"Free some space, then continue the run with: cov3d train --resume {run_dir}"
    return "Free some space and start the run again (it had not finished an epoch)."


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    Raises ``Cov3dError`` naming `path` if the disk is full or cannot be written.
    """
    with replaced_atomically(path, resume_remedy(path.parent)) as temp:
        torch.save(state, temp)


def load_resume_state(run_dir: Path) -> dict[str, Any]:
    """Read `run_dir/checkpoint.pth` (tensors and plain values only); one-line errors if absent or damaged."""
    path = Path(run_dir) / RESUME_FILE
    if not path.is_file():
        raise Cov3dError(
            f"{path} not found: the run in {run_dir} cannot be continued. Run the 'cov3d train' command that "
            "started it again with `overwrite` (its weights are replaced) or with another `output_dir`."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise Cov3dError(f"Cannot read {path} ({error}); start a new run without `resume`.") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise Cov3dError(f"{path} is not a cov3d checkpoint (format {CHECKPOINT_FORMAT}); start a new run without `resume`.")
    return state


def restore_train_loader_rng(dls, resume_state: dict[str, Any]) -> None:
    """Give the training loader's shuffling generator the state a checkpoint recorded."""
    dls.train.rng.setstate(unpack_python_state(resume_state["train_loader_rng"]))


class TrainingState(Callback):
    """Write checkpoint.pth after every epoch (main process only); when resuming, restore the loop's state.

    Restored at `before_fit`, after fastai has moved the model to its device (in place) and created
    the optimiser, and after its Recorder and MixedPrecision have set themselves up: the optimiser
    state (placed like each parameter), the smoothed training loss, the fp16 loss scale, the RNG
    states and the training loader's shuffling generator, so the next epoch draws exactly what it
    would have drawn in an uninterrupted run.

    Under DDP every process draws from its own seeds (dropout, reflections): `gather` collects each
    process's RNG states after every epoch (all processes call it) and the checkpoint keeps them all
    (``replica_rng``, by rank), so each process of a resumed run continues its own streams. Resumed
    with more processes than were saved, the new ranks derive theirs from rank 0's.
    """

    order = 90  # after BestCheckpoints (70) and MetricsLog (65): the checkpoint records their results

    def __init__(self, path: Path, best, first_epoch: int, resume_state: dict[str, Any] | None, write: bool,
                 gather: Callable[[Any], list] | None = None, rank: int = 0):
        self.path, self.best, self.first_epoch = Path(path), best, first_epoch
        self.resume_state, self.write = resume_state, write
        self.gather, self.rank = gather or (lambda value: [value]), rank

    def before_fit(self) -> None:
        if self.resume_state is None:
            return
        load_optimizer_state(self.opt, self.resume_state["optimizer"])
        smooth = self.resume_state["smooth_loss"]
        self.recorder.smooth_loss.count = smooth["count"]
        self.recorder.smooth_loss.val = smooth["value"].to(self.recorder.smooth_loss.val.device)
        restore_train_loader_rng(self.dls, self.resume_state)
        replicas = self.resume_state.get("replica_rng") or [self.resume_state["rng"]]
        if self.rank < len(replicas):
            set_rng_states(replicas[self.rank])
        else:
            set_rng_states(replicas[0])
            seed_replica(int(torch.randint(2**62, ())), self.rank)
        scaler = getattr(self.learn, "scaler", None)  # fastai MixedPrecision's GradScaler (fp16 on CUDA)
        if scaler is not None and self.resume_state["grad_scaler"]:
            scaler.load_state_dict(self.resume_state["grad_scaler"])

    def after_epoch(self) -> None:
        replica_rng = self.gather(rng_states())
        if self.write:
            save_resume_state(self.path, self.state(replica_rng))

    def state(self, replica_rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything the next epoch depends on, after the epoch `first_epoch + self.epoch`
        (`replica_rng`: every process's RNG states, by rank; default this process's)."""
        replica_rng = replica_rng or [rng_states()]
        model = unwrap(self.model)
        smooth = self.recorder.smooth_loss
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.first_epoch + self.epoch,
            "model": {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()},
            "optimizer": optimizer_state(self.opt),
            "best": {name: float(value) for name, value in self.best.best.items()},
            "best_epoch": dict(self.best.best_epoch),
            "smooth_loss": {"count": int(smooth.count), "value": torch.as_tensor(smooth.val).detach().cpu()},
            "rng": replica_rng[0],
            "replica_rng": replica_rng,
            "train_loader_rng": pack_python_state(self.dls.train.rng.getstate()),
            "grad_scaler": scaler.state_dict() if (scaler := getattr(self.learn, "scaler", None)) is not None else {},
        }


def monitored_metrics(settings: TrainSettings) -> list[str]:
    """The validation scores whose best a run records: each task it trains."""
    return [metric.name for metric in task_metrics(settings.severity_factor) if metric.name in WEIGHTS_BY_METRIC]


def kept_metrics(settings: TrainSettings) -> list[str]:
    """The validation scores whose best epoch's weights a run keeps: each task's (``per-task``), or only
    the first, presence unless lambda = 1 (``kept_weights="one"``, the original code)."""
    monitored = monitored_metrics(settings)
    return monitored[:1] if settings.kept_weights == ONE_CHECKPOINT else monitored


def check_kept_weights(run_dir: Path, settings: TrainSettings, resume_state: dict) -> None:
    """Refuse to evaluate a trained run (``--resume`` after its last epoch) that lost weights its
    checkpoint says it kept: each kept score with a finite best has its weights file."""
    for metric in kept_metrics(settings):
        path = run_dir / WEIGHTS_BY_METRIC[metric]
        if math.isfinite(resume_state["best"].get(metric, -math.inf)) and not path.is_file():
            raise Cov3dError(f"{path} is missing, so the run's evaluation after training cannot run: restore it "
                             "from a copy, or train again with --overwrite.")


class BestCheckpoints(Callback):
    """After each epoch, note each monitored F1's best and save the weights (safetensors) whenever a
    ``kept`` one improves (default: every monitored one); weights with a NaN or infinite value (a diverged
    run) are never kept, whatever their scores."""

    order = 70  # after the Recorder has computed the epoch's metrics

    def __init__(self, run_dir: Path, monitored: list[str], first_epoch: int = 0, write: bool = True,
                 kept: list[str] | None = None):
        self.run_dir, self.monitored, self.first_epoch, self.write = run_dir, monitored, first_epoch, write
        self.kept = monitored if kept is None else kept
        self.best = {name: -math.inf for name in monitored}
        self.best_epoch = {name: -1 for name in monitored}

    def after_epoch(self) -> None:
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = dict(zip(names, self.recorder.log[1:]))
        diverged = non_finite_tensor(unwrap(self.model).state_dict())
        if diverged is not None:  # its scores mean nothing, and its weights must never be "best"
            print(f"Epoch {self.first_epoch + self.epoch}: non-finite weights ({diverged}); not kept as best.")
            return
        for name in self.monitored:
            value = float(values.get(name, math.nan))
            if not math.isnan(value) and value > self.best[name]:
                self.best[name], self.best_epoch[name] = value, self.first_epoch + self.epoch
                if self.write and name in self.kept:
                    state = {key: t.detach().cpu().contiguous() for key, t in unwrap(self.model).state_dict().items()}
                    write_bytes_atomically(self.run_dir / WEIGHTS_BY_METRIC[name], safetensors_bytes(state), resume_remedy(self.run_dir))
