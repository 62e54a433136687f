"""Check cov3d's accelerator paths in one run (within 10 minutes on one GPU) and print what was measured.

Meant for a machine with a CUDA GPU (the test suite runs on CPUs only); ``--device cpu`` runs the
checks a CPU can run, at small sizes. Each check prints one line: ``ok`` or ``FAIL`` (or ``skip``
with the reason, for a check this machine cannot run), with its numbers and its time; an
exception inside a check is a ``FAIL`` line naming it, and the next check runs. The exit code is 1
if any check failed. The checks:

 1. precision rule: ``--precision auto`` picks bf16 only where the device has it natively (CUDA:
    compute capability >= 8.0), else fp16 with the grad scaler (CUDA) or fp32 (CPU);
 2. levels: uint8 levels become the same float32 values on the device as on the CPU, bit for bit;
 3. train + resume, once per precision (GPU: bf16 and fp16; CPU: fp32 and bf16): a 2-epoch run, and
    the same run stopped after epoch 1 and continued with ``--resume``. Fails unless both finish with
    finite losses and best weights on disk, every convolution ran on the device in the dtype claimed,
    the resumed optimiser state sits with its parameters, and the resumed run's metrics equal the
    uninterrupted run's exactly (reproducibility on this device);
 4. inference: fp32 with TF32 off (the reference) against bf16 and fp16 autocast (max |dP(covid)|),
    with the dtype and device every convolution ran in;
 5. infer with 2 preprocessing workers and ``--mc-samples 2``: every scan predicted, finite
    probabilities, a nonzero Monte-Carlo spread;
 6. fp16 grad scaler: an overflowing step (an infinite gradient injected) is skipped (weights
    unchanged, loss scale reduced) and the next one is taken; bf16: steps stay finite;
 7. explain: ``cov3d explain`` at the large size and its peak device memory (limit
    ``EXPLAIN_LIMIT_GIB``);
 8. memory: peak memory of a large-size training step through the real fastai path, batch 2, 4, 8;
    batch 2 must fit in the paper's V100 (32 GiB) and the peaks must grow with the batch;
 9. torchrun: 2 processes (nccl where 2 GPUs exist, gloo in the CPU mode): identical final weights,
    different per-process seeds, one shuffled order.

    python scripts/device_check.py                  # a CUDA GPU
    python scripts/device_check.py --device cpu     # the CPU mode
    python scripts/device_check.py --only train,torchrun   # some checks only

The checks' own output (training progress bars, log lines) goes to the file ``--log`` names.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.optimizer import Adam
from torch import nn

from cov3d.dataset.scans import find_scans
from cov3d.errors import one_line
from cov3d.inference.infer import infer
from cov3d.preprocessing.cache import from_levels, values_on
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runfiles import WEIGHTS_BY_METRIC
from cov3d.runtime import CUDA_NATIVE_BF16, choose_precision, cpu_bf16_features, resolve_device
from cov3d.settings import PRESETS, VolumeShape
from cov3d.synthetic.generator import generate_dataset
from cov3d.training import train as train_module
from cov3d.training.callbacks import FiniteGuard
from cov3d.training.checkpoint import misplaced_optimizer_state
from cov3d.training.data import LevelsToValues, TensorCT, collect_items
from cov3d.training.train import TrainSettings, resume_training, train
from cov3d.workflows.benchmark import make_dataset, peak_memory, training_parts

AUTOCAST_TOLERANCE = 0.05
"""Largest |P(covid) under autocast - P(covid) in fp32 (TF32 off)| accepted."""
EXPLAIN_LIMIT_GIB = 6.0
"""Peak device memory allowed for ``cov3d explain`` at the large size (a full fp32 graph needs 10-20 GB)."""
PAPER_GPU_GIB = 32.0
"""The paper's GPU (V100-32GB): a large-size training step at batch 2 must fit in it."""
MEMORY_BATCHES = (2, 4, 8)
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPECTED_CONV_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TORCHRUN_TIMEOUT_S = 900


class Skip(Exception):
    """This machine cannot run the check (the reason is printed on a ``skip`` line)."""


LOG: Path | None = None
"""Where the checks' own output (progress bars, log lines) goes; None: the terminal (``--verbose``)."""


def run_check(name: str, check: Callable[..., tuple[bool, str]], *args) -> bool | None:
    """Run one check and print its line; True (ok), False (FAIL, also for any exception) or None (skip)."""
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if LOG is not None:
                log = stack.enter_context(LOG.open("a"))
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            ok, line = check(*args)
    except Skip as reason:
        ok, line = None, str(reason)
    except Exception as error:  # noqa: BLE001 - a failing check must not stop the others
        ok, line = False, f"{type(error).__name__}: {one_line(error)[:400]}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    label = {True: "ok  ", False: "FAIL", None: "skip"}[ok]
    print(f"{label} {name}: {line} [{time.perf_counter() - start:.0f} s]", flush=True)
    return ok


@contextlib.contextmanager
def conv_probe() -> Iterator[set[str]]:
    """Record '<device type>/<dtype>' of every Conv3d output while the context is open (all models)."""
    seen: set[str] = set()

    def hook(module: nn.Module, _inputs, output) -> None:
        if isinstance(module, nn.Conv3d) and isinstance(output, torch.Tensor):
            seen.add(f"{output.device.type}/{str(output.dtype).removeprefix('torch.')}")

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Plain fp32 matmuls and convolutions on CUDA (no TF32), for reference results."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def expected_convs(device: torch.device, precision: str) -> set[str]:
    return {f"{device.type}/{EXPECTED_CONV_DTYPE[precision]}"}


# 1 -------------------------------------------------------------------------------------------------
def check_precision_rule(device: torch.device) -> tuple[bool, str]:
    chosen = choose_precision("auto", device)
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device) >= CUDA_NATIVE_BF16
        expected = "bf16" if native else "fp16"
    else:
        expected = "bf16" if cpu_bf16_features() and torch.backends.mkldnn.is_available() else "fp32"
    return chosen.name == expected, f"auto -> {chosen.name} ({chosen.reason}); the rule says {expected}"


# 2 -------------------------------------------------------------------------------------------------
def check_levels(device: torch.device) -> tuple[bool, str]:
    levels = torch.randint(0, 256, (2, 1, 8, 32, 32), dtype=torch.uint8)
    expected = from_levels(levels)
    on_device = values_on(levels, device)
    batch = LevelsToValues()(TensorCT(levels.to(device)))
    same = torch.equal(on_device.cpu(), expected) and torch.equal(batch.as_subclass(torch.Tensor).cpu(), expected)
    return same and on_device.device.type == device.type, f"uint8 -> float32 on {on_device.device}, identical to the CPU's: {same}"


# 3 -------------------------------------------------------------------------------------------------
class StopAfterFirstEpoch(Callback):
    """Ends the fit after the first epoch's checkpoint is written, as a killed job would leave it."""

    order = 100  # after TrainingState (90)

    def after_epoch(self) -> None:
        raise CancelFitException()


class FitProbe(Callback):
    """Records the device/dtype of every convolution during the fit and, at its end, misplaced optimiser state."""

    order = 100

    def __init__(self):
        self.seen: set[str] = set()
        self.misplaced: list[str] = []

    def before_fit(self) -> None:
        def hook(_module, _inputs, output) -> None:
            self.seen.add(f"{output.device.type}/{str(output.dtype).removeprefix('torch.')}")

        self.handles = [m.register_forward_hook(hook) for m in self.learn.model.modules() if isinstance(m, nn.Conv3d)]

    def after_fit(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.misplaced = misplaced_optimizer_state(self.learn.opt)


@contextlib.contextmanager
def extra_callbacks(*callbacks: Callback) -> Iterator[None]:
    """Add `callbacks` to the Learner that ``cov3d.training.train`` builds."""
    original = train_module.precision_callbacks
    with mock.patch.object(train_module, "precision_callbacks", lambda device, dtype: [*original(device, dtype), *callbacks]):
        yield


def metric_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(handle)]


def finished_run(run: Path) -> list[str]:
    """What is wrong with a finished run folder (empty: nothing)."""
    problems = []
    rows = metric_rows(run)
    if not all(math.isfinite(float(row[name])) for row in rows for name in ("train_loss", "valid_loss")):
        problems.append("non-finite losses")
    summary = json.loads((run / "summary.json").read_text())
    for name, score in summary["best_scores"].items():
        if not math.isfinite(score):
            problems.append(f"best {name} never set")
        elif not (run / WEIGHTS_BY_METRIC[name]).is_file():
            problems.append(f"{WEIGHTS_BY_METRIC[name]} missing")
    return problems


def check_train_and_resume(work: Path, device: torch.device, precision: str, size: tuple[int, int, int]) -> tuple[bool, str]:
    settings = TrainSettings(shape=VolumeShape(*size), epochs=2, penultimate=16)
    options = {"cache_dir": work / "cache", "device": str(device), "precision": precision, "workers": 2}
    full, split = work / f"run-{precision}", work / f"run-{precision}-resumed"
    start = time.perf_counter()
    probe = FitProbe()
    with extra_callbacks(probe):
        train(work / "data", full, settings, pretrained=False, **options)
    seconds = time.perf_counter() - start
    with extra_callbacks(StopAfterFirstEpoch()):
        train(work / "data", split, settings, pretrained=False, **options)
    resumed_probe = FitProbe()
    with extra_callbacks(resumed_probe):
        resume_training(split, **options)
    problems = finished_run(full) + finished_run(split)
    expected = expected_convs(device, precision)
    if probe.seen != expected or resumed_probe.seen != expected:
        problems.append(f"convolutions ran as {sorted(probe.seen | resumed_probe.seen)}, not {sorted(expected)}")
    if resumed_probe.misplaced:
        problems.append(f"optimiser state left behind: {resumed_probe.misplaced[0]}")
    same = metric_rows(full) == metric_rows(split)
    if not same:
        gap = max(abs(float(a[k]) - float(b[k])) for a, b in zip(metric_rows(full), metric_rows(split)) for k in a if k != "epoch")
        problems.append(f"resumed metrics differ from the uninterrupted run's (max {gap:.3g})")
    losses = ", ".join(f"{float(row['valid_loss']):.4f}" for row in metric_rows(full))
    line = (f"2 epochs at {'x'.join(map(str, size))} in {seconds:.0f} s (valid_loss {losses}), convolutions "
            f"{'/'.join(sorted(probe.seen))}; 1 epoch + --resume 1: " + ("; ".join(problems) if problems else
            "optimiser state with its parameters, metrics identical to the uninterrupted run"))
    return not problems, line


# 4 -------------------------------------------------------------------------------------------------
def check_inference(work: Path, run: Path, device: torch.device) -> tuple[bool, str]:
    scans = find_scans([work / "data" / "test"])
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    probabilities, seen, problems = {}, {}, []
    for precision in precisions:
        output = work / f"preds-{precision}.csv"
        with tf32_off() if precision == "fp32" else contextlib.nullcontext(), conv_probe() as convs:
            infer(scans, run, output, cache_dir=work / "cache", device=str(device), precision=precision, progress=False)
        with output.open() as handle:
            probabilities[precision] = [float(row["covid_probability"]) for row in csv.DictReader(handle)]
        seen[precision] = "/".join(sorted(convs))
        if convs != expected_convs(device, precision):
            problems.append(f"{precision} ran as {seen[precision]}")
    gaps = {p: max(abs(a - b) for a, b in zip(probabilities["fp32"], probabilities[p])) for p in precisions[1:]}
    problems += [f"{p} off by {gap:.4f}" for p, gap in gaps.items() if gap > AUTOCAST_TOLERANCE]
    line = (f"{len(scans)} scans, fp32 (TF32 off) as {seen['fp32']} vs "
            + ", ".join(f"{p} as {seen[p]}: max |dP(covid)| = {gap:.4f}" for p, gap in gaps.items())
            + f" (limit {AUTOCAST_TOLERANCE})" + (f"; {'; '.join(problems)}" if problems else ""))
    return not problems and len(probabilities["fp32"]) == len(scans), line


# 5 -------------------------------------------------------------------------------------------------
def check_infer_workers_mc(work: Path, run: Path, device: torch.device) -> tuple[bool, str]:
    scans = find_scans([work / "data" / "test"])
    output = work / "preds-mc.csv"
    with conv_probe() as convs:
        summary = infer(scans, run, output, cache_dir=work / "cache-mc", device=str(device), workers=2, mc_samples=2,
                        progress=False)
    with output.open() as handle:
        rows = list(csv.DictReader(handle))
    spreads = [float(row["covid_probability_std"]) for row in rows]
    finite = all(math.isfinite(float(row["covid_probability"])) for row in rows) and all(map(math.isfinite, spreads))
    on_device = {entry.split("/")[0] for entry in convs} == {device.type}
    ok = len(rows) == len(scans) and not summary.failed and finite and max(spreads) > 0 and on_device
    return ok, (f"{len(rows)}/{len(scans)} scans, {len(summary.failed)} failed, fresh cache through 2 workers, "
                f"MC spread of P(covid) max {max(spreads):.4f} (must be > 0), finite {finite}, ran on {'/'.join(sorted(convs))}")


# 6 -------------------------------------------------------------------------------------------------
class StepRecorder(Callback):
    """Weights (flattened) and loss scale before and after each training batch; optionally an
    infinite gradient in the first batch; ends the fit after `batches` batches."""

    order = 5  # before MixedPrecision (10): the overflow is in place when the scaler looks

    def __init__(self, batches: int, overflow: bool):
        self.batches, self.overflow, self.records = batches, overflow, []

    def _state(self) -> tuple[torch.Tensor, float]:
        weights = torch.cat([p.detach().float().flatten().cpu() for p in self.learn.model.parameters()])
        scaler = getattr(self.learn, "scaler", None)
        return weights, float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else math.nan

    def before_batch(self) -> None:
        if self.training:
            self.before = self._state()

    def after_backward(self) -> None:
        if self.overflow and self.iter == 0:
            next(self.learn.model.parameters()).grad.fill_(math.inf)

    def after_batch(self) -> None:
        if not self.training:
            return
        self.records.append((self.before, self._state(), float(self.learn.loss.detach())))
        if len(self.records) == self.batches:
            raise CancelFitException()


def short_learner(work: Path, device: torch.device, dtype: torch.dtype, recorder: StepRecorder,
                  size: tuple[int, int, int]) -> Learner:
    """The model, loss, loaders and precision callbacks as ``cov3d train`` builds them, on the checks' data."""
    settings = TrainSettings(shape=VolumeShape(*size), penultimate=16, batch_size=2)
    dls, model, loss = training_parts(collect_items(work / "data"), VolumeCache(work / "cache", VolumeShape(*size)), settings, device)
    guard = FiniteGuard(run_dir=work, epochs=1, first_epoch=0, precision=str(dtype), learning_rate=1e-4,
                        check_gradients=dtype != torch.float16)
    learner = Learner(dls, model, loss_func=loss, opt_func=Adam, wd=1e-5,
                      cbs=[*train_module.precision_callbacks(device, dtype), guard, recorder])
    learner.remove_cb(ProgressCallback)
    return learner


def check_fp16_scaler(work: Path, device: torch.device, size: tuple[int, int, int]) -> tuple[bool, str]:
    if device.type != "cuda":
        raise Skip("fp16 autocast with fastai's grad scaler needs CUDA")
    recorder = StepRecorder(batches=2, overflow=True)
    short_learner(work, device, torch.float16, recorder, size).fit(1, lr=1e-3)
    (before0, scale0), (after0, scale1), _ = recorder.records[0]
    (before1, _), (after1, scale2), loss1 = recorder.records[1]
    skipped = torch.equal(before0, after0)
    stepped = not torch.equal(before1, after1) and bool(torch.isfinite(after1).all())
    ok = skipped and scale1 < scale0 and stepped and math.isfinite(loss1)
    return ok, (f"injected inf gradient: step skipped (weights unchanged) {skipped}, loss scale {scale0:g} -> {scale1:g}; "
                f"next step taken {stepped}, finite, scale {scale2:g}")


def check_bf16_finite(work: Path, device: torch.device, size: tuple[int, int, int]) -> tuple[bool, str]:
    recorder = StepRecorder(batches=3, overflow=False)
    short_learner(work, device, torch.bfloat16, recorder, size).fit(1, lr=1e-3)
    losses = [loss for _, _, loss in recorder.records]
    finite = all(map(math.isfinite, losses)) and all(bool(torch.isfinite(after).all()) for _, (after, _), _ in recorder.records)
    moved = all(not torch.equal(before, after) for (before, _), (after, _), _ in recorder.records)
    return finite and moved, f"3 steps, losses {', '.join(f'{v:.4f}' for v in losses)}, weights finite {finite}, every step applied {moved}"


# 7 -------------------------------------------------------------------------------------------------
def check_explain(work: Path, run: Path, device: torch.device, size: tuple[int, int, int]) -> tuple[bool, str]:
    from typer.testing import CliRunner

    from cov3d.cli import app

    sized = work / f"run-{'x'.join(map(str, size))}"
    shutil.copytree(run, sized, dirs_exist_ok=True)
    config = json.loads((sized / "config.json").read_text())
    config.update(depth=size[0], height=size[1], width=size[2])
    (sized / "config.json").write_text(json.dumps(config))
    scan = sorted((work / "data" / "validation" / "covid").iterdir())[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with conv_probe() as convs:
        result = CliRunner().invoke(app, ["explain", str(scan), "--model", str(sized), "--output", str(work / "explain"),
                                          "--cache-dir", str(work / "cache"), "--device", str(device)])
    if result.exit_code != 0:
        return False, f"exit code {result.exit_code}: {(result.output or repr(result.exception)).strip()[-300:]}"
    cam = torch.load(work / "explain" / f"{scan.name}-gradcam.pt", weights_only=True)
    shape_ok = tuple(cam.shape) == size and float(cam.max()) == 1.0
    line = f"at {'x'.join(map(str, size))}, map {tuple(cam.shape)}, convolutions {'/'.join(sorted(convs))}, "
    if device.type != "cuda":
        return shape_ok, line + "peak memory not measured on a CPU"
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    return shape_ok and peak <= EXPLAIN_LIMIT_GIB, line + f"peak {peak:.2f} GiB (limit {EXPLAIN_LIMIT_GIB:g})"


# 8 -------------------------------------------------------------------------------------------------
def check_memory(work: Path, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        raise Skip("device memory is measured on CUDA only")
    precision = choose_precision("auto", device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    items, cache = make_dataset(work / "memory", PRESETS["large"], 1, max(MEMORY_BATCHES))
    peaks: dict[int, float | None] = {}
    for batch in MEMORY_BATCHES:
        settings = TrainSettings(shape=PRESETS["large"], batch_size=batch, epochs=1)
        try:
            peaks[batch] = peak_memory(items, cache, settings, device, precision.dtype)
        except torch.cuda.OutOfMemoryError:
            peaks[batch] = None
            torch.cuda.empty_cache()
    measured = [peaks[b] for b in MEMORY_BATCHES if peaks[b] is not None]
    growing = all(a < b for a, b in zip(measured, measured[1:]))
    fits = peaks[2] is not None and peaks[2] <= PAPER_GPU_GIB
    shown = ", ".join(f"batch {b}: " + ("out of memory" if p is None else f"{p:.2f} GiB") for b, p in peaks.items())
    return fits and growing, (
        f"large {PRESETS['large']}, {precision.name}, fastai step: {shown} of {total:.0f} GiB; batch 2 within the "
        f"paper's {PAPER_GPU_GIB:g} GiB {fits}, growing with the batch {growing}")


# 9 -------------------------------------------------------------------------------------------------
def check_torchrun(work: Path, device: torch.device, size: tuple[int, int, int]) -> tuple[bool, str]:
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU visible; a 2-process nccl run needs 2")
    launcher = work / "launch_cov3d.py"
    launcher.write_text('from cov3d.cli import app\n\nif __name__ == "__main__":  # the fork server imports this file\n    app()\n')
    run = work / "run-ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher), "train",
        "--directory", str(work / "data"), "--output-dir", str(run), "--cache-dir", str(work / "cache"),
        "--depth", str(size[0]), "--height", str(size[1]), "--width", str(size[2]), "--epochs", "1",
        "--penultimate", "8", "--no-pretrained", "--device", device.type, "--workers", "2",
        "--precision", "auto" if device.type == "cuda" else "fp32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                                  os.environ.get("PYTHONPATH", "")])}
    output = work / "torchrun.log"
    with output.open("w") as log:  # a new session: on a timeout the whole process group is stopped
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=TORCHRUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return False, f"no result within {TORCHRUN_TIMEOUT_S} s: {output.read_text().strip()[-300:]}"
    if code != 0:
        return False, f"torchrun exit code {code}: {output.read_text().strip()[-300:]}"
    summary = json.loads((run / "summary.json").read_text())
    same_weights = len(set(summary["replica_digests"])) == 1
    own_seeds = len(set(summary["replica_seeds"])) == 2
    one_order = len(set(summary["replica_shufflers"])) == 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    return same_weights and own_seeds and one_order, (
        f"2 processes ({backend}): identical final weights {same_weights}, own seeds {own_seeds}, one shuffled order {one_order}")


CHECKS = ("precision", "levels", "train", "inference", "infer-mc", "explain", "scaler", "bf16", "memory", "torchrun")


def trained_run(work: Path, device: torch.device, precision: str, size: tuple[int, int, int]) -> Path:
    """The run of the first `train + resume` check, or (that check not selected) a 1-epoch run."""
    run = work / f"run-{precision}"
    if not (run / "summary.json").is_file():
        settings = TrainSettings(shape=VolumeShape(*size), epochs=1, penultimate=16)
        train(work / "data", run, settings, pretrained=False, cache_dir=work / "cache", device=str(device),
              precision=precision, workers=2)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--size", default=None, help="DxHxW of the training runs (default 16x64x64 on GPUs, 8x32x32 on CPUs)")
    parser.add_argument("--explain-size", default=None, help="size of the explain check (default large on GPUs, small on CPUs)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks to run (default all: {','.join(CHECKS)})")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cov3d-device-check.log",
                        help="file for the checks' own output: progress bars, log lines (default: in the temp folder)")
    parser.add_argument("--verbose", action="store_true", help="show the checks' own output instead")
    args = parser.parse_args()
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := sorted(set(selected) - set(CHECKS)):
        parser.error(f"unknown checks {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    global LOG
    LOG = None if args.verbose else args.log
    if LOG is not None:
        LOG.write_text("")
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    size = VolumeShape.parse(args.size or ("16x64x64" if gpu else "8x32x32")).dims
    explain_size = VolumeShape.parse(args.explain_size or ("large" if gpu else "small")).dims
    name = f"{torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} visible" if gpu else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}"
          + (f"; the checks' own output: {LOG}" if LOG else ""), flush=True)
    precisions = ("bf16", "fp16") if gpu else ("fp32", "bf16")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        generate_dataset(work / "data", scans=16, test_scans=4, seed=0, slice_size=max(size[2], 32), depth_scale=0.05)
        run = lambda: trained_run(work, device, precisions[0], size)  # noqa: E731 - trained on first use
        plan = {
            "precision": [("precision rule", check_precision_rule, device)],
            "levels": [("levels", check_levels, device)],
            "train": [(f"train + resume {p}", check_train_and_resume, work, device, p, size) for p in precisions],
            "inference": [("inference precisions", lambda: check_inference(work, run(), device))],
            "infer-mc": [("infer workers + MC dropout", lambda: check_infer_workers_mc(work, run(), device))],
            "explain": [("explain", lambda: check_explain(work, run(), device, explain_size))],
            "scaler": [("fp16 grad scaler", check_fp16_scaler, work, device, size)],
            "bf16": [("bf16 finite", check_bf16_finite, work, device, size)],
            "memory": [("memory", check_memory, work, device)],
            "torchrun": [("torchrun", check_torchrun, work, device, size)],
        }
        for key in CHECKS:
            if key in selected:
                results += [run_check(*entry) for entry in plan[key]]
    failed = sum(result is False for result in results)
    print(f"{failed} failed, {sum(result is True for result in results)} ok, {sum(result is None for result in results)} skipped")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
