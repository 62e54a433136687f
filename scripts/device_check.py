"""Check cov3d's accelerator paths on the machine at hand and print what was measured, one line a check.

Meant for a machine with a CUDA GPU (the test suite runs on CPUs only); ``--device cpu`` runs the checks
a CPU can run, at small sizes. Every check runs in its own process with its own timeout (a hung or
crashed check is a ``FAIL`` line, and the next one runs) and prints ``ok``, ``FAIL`` or ``skip`` (with
the reason, for a check this machine cannot run), with its numbers and its time. Each check compares
cov3d's rule or estimate with what the hardware does or reports, so that it can fail. The exit code
is 1 if any check failed. The groups (``--only``; each under 5 minutes on one H200):

  setup       the wheel's architecture list against the GPU and a kernel launch; ``--device auto`` with
              the GPU hidden stops instead of training on the CPU; ``--precision auto`` against a timed
              bf16 / fp32 convolution (native bf16 or not); uint8 levels on the device
  precision   bf16 refused below compute capability 8.0 (simulated on a newer GPU, and said so); runs
              resumed across precision: fp16 (auto on a 7.0 GPU, simulated) with a loss scale changed by an
              overflow, resumed here where auto means bf16, and bf16 resumed on a 7.0 GPU (simulated);
              the fp16 grad scaler skips an overflowing step; bf16 steps stay finite
  train       2-epoch runs against 1 epoch + --resume, once per precision: identical metrics
  inference   autocast against fp32 inference; workers + Monte-Carlo dropout; explain and its memory
  speed       samples/s at the small size with deterministic kernels and without
  speed-large the same at the large size (GPU only)
  memory      peak memory of a large training step (max_memory_reserved plus the CUDA context) against
              the estimate ``cov3d train`` checks before its first step
  torchrun    2 processes of cov3d train (nccl with 2 GPUs, gloo in the CPU mode)
  ddp         scripts/device_check_ddp.py, one check per group: host waits per training step counted by
              CUDA, the loss on the GPU, LOCAL_RANK refused, post-training logits in the run's precision

    python scripts/device_check.py --only setup,precision     # a CUDA GPU
    python scripts/device_check.py --device cpu               # the CPU mode

The checks' own output (training progress bars, log lines) goes to the file ``--log`` names.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
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

from cov3d import runtime
from cov3d.dataset.scans import find_scans
from cov3d.errors import Cov3dError, one_line
from cov3d.inference.infer import infer
from cov3d.preprocessing.cache import from_levels, values_on
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runfiles import WEIGHTS_BY_METRIC
from cov3d.runtime import arch_mismatch, choose_precision, resolve_device
from cov3d.settings import PRESETS, VolumeShape
from cov3d.synthetic.generator import generate_dataset
from cov3d.training import train as train_module
from cov3d.training.callbacks import FiniteGuard
from cov3d.training.checkpoint import load_resume_state, misplaced_optimizer_state
from cov3d.training.data import LevelsToValues, TensorCT, collect_items
from cov3d.training.memory import CUDA_CONTEXT_BYTES, GIB, estimate_training_memory
from cov3d.training.train import TrainSettings, resume_training, train
from cov3d.workflows.benchmark import fastai_loop, make_dataset, peak_memory, training_parts

AUTOCAST_TOLERANCE = 0.05
"""Largest |P(covid) under autocast - P(covid) in fp32 (TF32 off)| accepted."""
EXPLAIN_LIMIT_GIB = 6.0
"""Peak device memory allowed for ``cov3d explain`` at the large size (a full fp32 graph needs 10-20 GB)."""
NATIVE_BF16_SPEEDUP = 1.3
"""A bf16 convolution at least this much faster than fp32 (TF32 off) means native bf16 kernels."""
MEMORY_ESTIMATE_RANGE = (0.6, 1.15)
"""Measured peak / estimate accepted: above, train's check would let an out-of-memory run start; well below,
it would refuse runs that fit."""
FAST_KERNELS_FLOOR = 0.9
"""--no-deterministic must give at least this share of --deterministic's samples/s (it lets cuDNN autotune)."""
MEMORY_BATCHES = (2, 4)
SPEED_STEPS, SPEED_WARMUP = 6, 2
SIMULATED_OLD_GPU = (7, 0)
"""The compute capability simulated on a newer GPU: a V100's."""
EXPECTED_CONV_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_TIMEOUT_S = 280
TORCHRUN_TIMEOUT_S = 250
"""Below the per-check timeout, so that a hung torchrun is reported with its log."""


class Skip(Exception):
    """This machine cannot run the check (the reason is printed on a ``skip`` line)."""


LOG: Path | None = None
"""Where the checks' own output (progress bars, log lines) goes; None: the terminal (``--verbose``)."""


def run_check(name: str, check: Callable[..., tuple[bool, str]], *args) -> bool | None:
    """Run one check in this process and print its line; True (ok), False (FAIL, also for any exception)
    or None (skip)."""
    start = time.perf_counter()
    ok, line = outcome(check, *args)
    label = {True: "ok  ", False: "FAIL", None: "skip"}[ok]
    print(f"{label} {name}: {line} [{time.perf_counter() - start:.0f} s]", flush=True)
    return ok


def outcome(check: Callable[..., tuple[bool, str]], *args) -> tuple[bool | None, str]:
    """``check(*args)`` with its own output sent to ``LOG``; an exception is a failure, ``Skip`` a skip."""
    try:
        with contextlib.ExitStack() as stack:
            if LOG is not None:
                log = stack.enter_context(LOG.open("a"))
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            return check(*args)
    except Skip as reason:
        return None, str(reason)
    except Exception as error:  # noqa: BLE001 - a failing check must not stop the others
        return False, f"{type(error).__name__}: {one_line(error)[:400]}"


def run_isolated(name: str, command: list[str], result: Path, timeout_s: float) -> bool | None:
    """Run one check as ``command`` (a process of its own, in a session of its own) that writes
    {"ok": ..., "line": ...} to ``result``; print its line. A timeout or a crash is a FAIL line."""
    start = time.perf_counter()
    result.unlink(missing_ok=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
        if result.is_file():
            answer = json.loads(result.read_text())
            ok, line = answer["ok"], answer["line"]
        else:
            ok, line = False, f"exit code {process.returncode} without a result: {one_line(stderr.decode(errors='replace'))[-300:]}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        ok, line = False, f"no result within {timeout_s:g} s (stopped)"
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


@contextlib.contextmanager
def simulated_capability(capability: tuple[int, int]) -> Iterator[None]:
    """The GPU answers ``capability`` to cov3d's precision rule (its kernels stay those of the real GPU)."""
    with mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: capability), \
            mock.patch.object(runtime, "check_gpu_runs", lambda device: None):
        yield


@contextlib.contextmanager
def logged_lines() -> Iterator[list[str]]:
    """The messages of the ``cov3d`` loggers while the block runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("cov3d")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def expected_convs(device: torch.device, precision: str) -> set[str]:
    return {f"{device.type}/{EXPECTED_CONV_DTYPE[precision]}"}


def need_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} needs a CUDA GPU")


# setup -----------------------------------------------------------------------------------------------
def check_wheel(device: torch.device) -> tuple[bool, str]:
    need_cuda(device, "the wheel's architecture list")
    capability = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    predicted = arch_mismatch(capability, archs) is None
    try:
        ran, failure = float((torch.arange(4.0, device=device) * 2).sum()) == 12.0, ""
    except RuntimeError as error:
        ran, failure = False, f": {one_line(error)[:150]}"
    return predicted == ran and ran, (
        f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}), torch "
        f"{torch.__version__} lists {' '.join(archs)}; cov3d predicts kernels {'present' if predicted else 'missing'}, "
        f"a kernel {'ran' if ran else 'failed' + failure}")


def check_auto_fallback(device: torch.device) -> tuple[bool, str]:
    need_cuda(device, "the --device auto fallback")
    picked = resolve_device("auto")
    code = ("from cov3d.runtime import resolve_device\ntry:\n    print('DEVICE', resolve_device('auto'))\n"
            "except Exception as error:\n    print('ERROR', error)")
    hidden = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True, timeout=180)
    answer = (hidden.stdout.strip().splitlines() or ["nothing"])[-1]
    stopped = answer.startswith("ERROR") and "a GPU was expected" in answer
    return picked.type == "cuda" and stopped, (
        f"auto -> {picked}; with CUDA_VISIBLE_DEVICES='' auto {'stops: ' if stopped else 'does not stop: '}{answer[:250]}")


def conv_seconds(device: torch.device, dtype: torch.dtype | None, shape: tuple[int, ...]) -> float:
    """Best of 5 forward passes of a 64-channel 3x3x3 Conv3d on (N, 64, D, H, W) under autocast ``dtype``."""
    conv = nn.Conv3d(64, 64, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last_3d)
    volume = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last_3d)
    times = []
    with tf32_off(), torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(7):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            conv(volume)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times[2:])


def check_precision_rule(device: torch.device) -> tuple[bool, str]:
    chosen = choose_precision("auto", device)
    shape = (2, 64, 32, 96, 96) if device.type == "cuda" else (1, 64, 8, 24, 24)
    fp32, bf16 = conv_seconds(device, None, shape), conv_seconds(device, torch.bfloat16, shape)
    native = fp32 / bf16 >= NATIVE_BF16_SPEEDUP
    expected = "bf16" if native else ("fp16" if device.type == "cuda" else "fp32")
    return chosen.name == expected, (
        f"auto -> {chosen.name} ({chosen.reason}); a Conv3d {'x'.join(map(str, shape))} takes {fp32 * 1e3:.2f} ms in fp32 "
        f"(TF32 off), {bf16 * 1e3:.2f} ms in bf16 ({fp32 / bf16:.2f}x: {'native' if native else 'not native'} bf16, "
        f"threshold {NATIVE_BF16_SPEEDUP}x), so the rule should give {expected}")


# precision -------------------------------------------------------------------------------------------
def check_bf16_refusal(device: torch.device) -> tuple[bool, str]:
    need_cuda(device, "the bf16 refusal below compute capability 8.0")
    real = torch.cuda.get_device_capability(device)
    simulated = real >= runtime.CUDA_NATIVE_BF16
    with simulated_capability(SIMULATED_OLD_GPU) if simulated else contextlib.nullcontext():
        try:
            choose_precision("bf16", device)
            refusal = None
        except Cov3dError as error:
            refusal = str(error)
        resumed = choose_precision("bf16", device, resumed=True)
    note = (f"simulated compute capability {SIMULATED_OLD_GPU[0]}.{SIMULATED_OLD_GPU[1]} (this GPU is {real[0]}.{real[1]}, "
            "where bf16 is native): " if simulated else "")
    ok = refusal is not None and "no bf16 convolutions" in refusal and resumed.name == "fp16"
    return ok, (note + (f"--precision bf16 refused ({refusal[:120]}...)" if refusal else "--precision bf16 NOT refused")
                + f"; a resumed bf16 run continues in {resumed.name} ({resumed.reason[:90]}...)")


class InjectOverflow(Callback):
    """An infinite gradient in the first training step: fp16's scaler skips it and halves its scale."""

    order = 5

    def after_backward(self) -> None:
        if self.epoch == 0 and self.iter == 0:
            next(self.learn.model.parameters()).grad.fill_(math.inf)


class ResumeProbe(Callback):
    """The loss scale right after TrainingState restored the run, and the dtype of every convolution."""

    order = 95

    def __init__(self):
        self.scale, self.seen = None, set()

    def before_fit(self) -> None:
        scaler = getattr(self.learn, "scaler", None)
        self.scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

        def hook(_module, _inputs, output) -> None:
            self.seen.add(f"{output.device.type}/{str(output.dtype).removeprefix('torch.')}")

        self.handles = [m.register_forward_hook(hook) for m in self.learn.model.modules() if isinstance(m, nn.Conv3d)]

    def after_fit(self) -> None:
        for handle in self.handles:
            handle.remove()


def check_resume_across_precision(work: Path, device: torch.device, size: tuple[int, int, int]) -> tuple[bool, str]:
    need_cuda(device, "resuming across GPUs of different precision")
    settings = TrainSettings(shape=VolumeShape(*size), epochs=2, penultimate=16)
    options = {"cache_dir": work / "cache", "device": str(device), "precision": "auto", "workers": 2}
    problems = []
    # an fp16 run (auto on a 7.0 GPU) whose loss scale an overflow halved, resumed here (auto: bf16)
    fp16_run, probe = work / "run-auto-fp16", ResumeProbe()
    with simulated_capability(SIMULATED_OLD_GPU), extra_callbacks(InjectOverflow(), StopAfterFirstEpoch()):
        train(work / "data", fp16_run, settings, pretrained=False, **options)
    saved = load_resume_state(fp16_run)["grad_scaler"].get("scale")
    with extra_callbacks(probe), logged_lines() as lines:
        resume_training(fp16_run)
    initial = torch.amp.GradScaler("cuda").get_scale()
    if saved is None or saved >= initial or probe.scale != saved:
        problems.append(f"loss scale saved {saved}, restored {probe.scale} (initial {initial:g})")
    if probe.seen != expected_convs(device, "fp16") or not any("precision: fp16" in line for line in lines):
        problems.append(f"fp16 run resumed as {sorted(probe.seen)}")
    problems += [f"fp16 run: {p}" for p in finished_run(fp16_run)]
    # a bf16 run (auto here) resumed on a 7.0 GPU: fp16 with a new scaler, and said so
    bf16_run, probe_old = work / "run-auto-bf16", ResumeProbe()
    with extra_callbacks(StopAfterFirstEpoch()):
        train(work / "data", bf16_run, settings, pretrained=False, **options)
    with simulated_capability(SIMULATED_OLD_GPU), extra_callbacks(probe_old), logged_lines() as old_lines:
        resume_training(bf16_run)
    said = any("the run trained in bf16" in line for line in old_lines)
    if probe_old.seen != expected_convs(device, "fp16") or not said:
        problems.append(f"bf16 run resumed on a 7.0 GPU as {sorted(probe_old.seen)}, said so {said}")
    problems += [f"bf16 run: {p}" for p in finished_run(bf16_run)]
    return not problems, (
        f"fp16 run (auto on a simulated 7.0 GPU, an overflow injected) resumed here: loss scale {probe.scale} = saved "
        f"{saved} (initial {initial:g}), convolutions {'/'.join(sorted(probe.seen))}; bf16 run resumed on a simulated "
        f"7.0 GPU: convolutions {'/'.join(sorted(probe_old.seen))}, said so {said}"
        + (f"; {'; '.join(problems)}" if problems else ""))


# levels ----------------------------------------------------------------------------------------------
def check_levels(device: torch.device) -> tuple[bool, str]:
    levels = torch.randint(0, 256, (2, 1, 8, 32, 32), dtype=torch.uint8)
    expected = from_levels(levels)
    on_device = values_on(levels, device)
    batch = LevelsToValues()(TensorCT(levels.to(device)))
    same = torch.equal(on_device.cpu(), expected) and torch.equal(batch.as_subclass(torch.Tensor).cpu(), expected)
    return same and on_device.device.type == device.type, f"uint8 -> float32 on {on_device.device}, identical to the CPU's: {same}"


# train -----------------------------------------------------------------------------------------------
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


# inference -------------------------------------------------------------------------------------------
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


# fp16 scaler, bf16 steps -----------------------------------------------------------------------------
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


# explain ---------------------------------------------------------------------------------------------
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


# speed -----------------------------------------------------------------------------------------------
def check_speed(work: Path, device: torch.device, shape: VolumeShape) -> tuple[bool, str]:
    dtype = choose_precision("auto", device).dtype
    settings = TrainSettings(shape=shape, batch_size=2, epochs=1)
    items, cache = make_dataset(work / f"speed-{shape}", shape, SPEED_WARMUP + SPEED_STEPS, settings.batch_size)
    speeds = {deterministic: fastai_loop(items, cache, settings, device, dtype, SPEED_WARMUP, deterministic)
              for deterministic in (True, False)}
    finite = all(math.isfinite(v) and v > 0 for v in speeds.values())
    ratio = speeds[False] / speeds[True]
    return finite and ratio >= FAST_KERNELS_FLOOR, (
        f"{shape}, batch 2, {runtime.PRECISION_NAMES[dtype]}, fastai loop: {speeds[True]:.2f} samples/s with "
        f"--deterministic, {speeds[False]:.2f} with --no-deterministic ({ratio:.2f}x; at least {FAST_KERNELS_FLOOR} expected)")


def check_speed_large(work: Path, device: torch.device) -> tuple[bool, str]:
    need_cuda(device, "timing the large size")
    return check_speed(work, device, PRESETS["large"])


# memory ----------------------------------------------------------------------------------------------
def check_memory(work: Path, device: torch.device) -> tuple[bool, str]:
    need_cuda(device, "device memory")
    free, total = torch.cuda.mem_get_info(device)  # this process's CUDA context exists from here on
    context = total - free - torch.cuda.memory_reserved(device)
    dtype = choose_precision("auto", device).dtype
    items, cache = make_dataset(work / "memory", PRESETS["large"], 1, max(MEMORY_BATCHES))
    shown, problems = [], []
    for batch in MEMORY_BATCHES:
        settings = TrainSettings(shape=PRESETS["large"], batch_size=batch, epochs=1)
        estimate = estimate_training_memory(settings, dtype).total(batch, context=False) + context
        try:
            peak_memory(items, cache, settings, device, dtype)
        except torch.cuda.OutOfMemoryError:
            shown.append(f"batch {batch}: out of memory (estimate {estimate / GIB:.1f} GiB)")
            problems.append(f"batch {batch} ran out of memory")
            torch.cuda.empty_cache()
            continue
        measured = torch.cuda.max_memory_reserved(device) + context
        ratio = measured / estimate
        shown.append(f"batch {batch}: {measured / GIB:.1f} GiB measured, {estimate / GIB:.1f} estimated ({ratio:.2f})")
        if not MEMORY_ESTIMATE_RANGE[0] <= ratio <= MEMORY_ESTIMATE_RANGE[1]:
            problems.append(f"batch {batch} measured/estimated {ratio:.2f} outside {MEMORY_ESTIMATE_RANGE}")
    return not problems, (
        f"large {PRESETS['large']}, {runtime.PRECISION_NAMES[dtype]}, max_memory_reserved + CUDA context "
        f"{context / GIB:.2f} GiB (cov3d assumes {CUDA_CONTEXT_BYTES / GIB:.2f}) of {total / GIB:.0f} GiB: " + "; ".join(shown)
        + (f"; {'; '.join(problems)}" if problems else ""))


# torchrun --------------------------------------------------------------------------------------------
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



# ddp -------------------------------------------------------------------------------------------------
DDP_GROUPS = ("syncs", "loss", "launch", "evaluation")
"""The groups of ``scripts/device_check_ddp.py`` (its ``CHECKS``; tests/test_device_check.py keeps them equal)."""


def check_ddp(group: str) -> tuple[bool, str]:
    """One group of ``scripts/device_check_ddp.py``, which prints its own ok / FAIL / skip line."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("device_check_ddp.py")), "--only", group],
                          capture_output=True, text=True)
    line = next((text for text in done.stdout.splitlines() if text[:4] in ("ok  ", "FAIL", "skip")), None)
    if line is None:
        return False, f"exit code {done.returncode} without a result: {' '.join(done.stderr.split()[-30:])}"
    if line.startswith("skip"):
        raise Skip(line[5:].strip())
    return line.startswith("ok"), line[5:].strip()


GROUPS = ("setup", "precision", "train", "inference", "speed", "speed-large", "memory", "torchrun", "ddp")


def trained_run(work: Path, device: torch.device, precision: str, size: tuple[int, int, int]) -> Path:
    """The run of the first `train + resume` check, or (that check not run) a 1-epoch run."""
    run = work / f"run-{precision}"
    if not (run / "summary.json").is_file():
        settings = TrainSettings(shape=VolumeShape(*size), epochs=1, penultimate=16)
        train(work / "data", run, settings, pretrained=False, cache_dir=work / "cache", device=str(device),
              precision=precision, workers=2)
    return run


def plan(work: Path, device: torch.device, size: tuple[int, int, int], explain_size: tuple[int, int, int]) -> dict:
    """Group -> [(name, check, arguments...)] for this device."""
    gpu = device.type == "cuda"
    precisions = ("bf16", "fp16") if gpu else ("fp32", "bf16")
    run = lambda: trained_run(work, device, precisions[0], size)  # noqa: E731 - trained on first use
    small = PRESETS["small"] if gpu else VolumeShape(*size)
    return {
        "setup": [("wheel", check_wheel, device), ("auto fallback", check_auto_fallback, device),
                  ("precision rule", check_precision_rule, device), ("levels", check_levels, device)],
        "precision": [("bf16 refusal", check_bf16_refusal, device),
                      ("resume across precision", check_resume_across_precision, work, device, size),
                      ("fp16 grad scaler", check_fp16_scaler, work, device, size),
                      ("bf16 finite", check_bf16_finite, work, device, size)],
        "train": [(f"train + resume {p}", check_train_and_resume, work, device, p, size) for p in precisions],
        "inference": [("inference precisions", lambda: check_inference(work, run(), device)),
                      ("infer workers + MC dropout", lambda: check_infer_workers_mc(work, run(), device)),
                      ("explain", lambda: check_explain(work, run(), device, explain_size))],
        "speed": [(f"speed {small}", check_speed, work, device, small)],
        "speed-large": [(f"speed {PRESETS['large']}", check_speed_large, work, device)],
        "memory": [("memory", check_memory, work, device)],
        "torchrun": [("torchrun", check_torchrun, work, device, size)],
        "ddp": [(f"ddp {group}", check_ddp, group) for group in DDP_GROUPS],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--size", default=None, help="DxHxW of the training runs (default 16x64x64 on GPUs, 8x32x32 on CPUs)")
    parser.add_argument("--explain-size", default=None, help="size of the explain check (default large on GPUs, small on CPUs)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups to run (default all: {','.join(GROUPS)})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds allowed to each check")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cov3d-device-check.log",
                        help="file for the checks' own output: progress bars, log lines (default: in the temp folder)")
    parser.add_argument("--verbose", action="store_true", help="show the checks' own output instead")
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)  # a check's own process:
    parser.add_argument("--check", default=None, help=argparse.SUPPRESS)  # the shared folder, which check,
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)  # and where its line goes
    args = parser.parse_args()
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := sorted(set(selected) - set(GROUPS)):
        parser.error(f"unknown groups {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    global LOG
    LOG = None if args.verbose else args.log
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    size = VolumeShape.parse(args.size or ("16x64x64" if gpu else "8x32x32")).dims
    explain_size = VolumeShape.parse(args.explain_size or ("large" if gpu else "small")).dims
    if args.check is not None:  # one check, in its own process
        checks = {entry[0]: entry for entries in plan(args.work, device, size, explain_size).values() for entry in entries}
        _, check, *arguments = checks[args.check]
        ok, line = outcome(check, *arguments)
        args.result.write_text(json.dumps({"ok": ok, "line": line}))
        return
    if LOG is not None:
        LOG.write_text("")
    name = f"{torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} visible" if gpu else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}" + (f"; the checks' own output: {LOG}" if LOG else ""), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        generate_dataset(work / "data", scans=16, test_scans=4, seed=0, slice_size=max(size[2], 32), depth_scale=0.05)
        for group, entries in plan(work, device, size, explain_size).items():
            if group not in selected:
                continue
            for entry in entries:
                command = [sys.executable, __file__, "--device", str(device), "--size", "x".join(map(str, size)),
                           "--explain-size", "x".join(map(str, explain_size)), "--work", str(work),
                           "--check", entry[0], "--result", str(work / "result.json")]
                command += ["--verbose"] if LOG is None else ["--log", str(LOG)]
                results.append(run_isolated(entry[0], command, work / "result.json", args.timeout))
    failed = sum(result is False for result in results)
    print(f"{failed} failed, {sum(result is True for result in results)} ok, {sum(result is None for result in results)} skipped")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
