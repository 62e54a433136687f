"""Check on a CUDA GPU what the CPU tests of the DDP and host-wait paths can only approximate.

Each group runs in its own process with its own timeout and prints one line: ``ok``, ``FAIL`` or
``skip`` (with the reason), its numbers and its time; the exit code is 1 if any failed. Groups:

- ``syncs``: host waits per training step, counted by CUDA itself (``torch.cuda.set_sync_debug_mode``),
  with the trainer's loss, finite guard, loss averages, 1cycle schedule, optimiser and cluster log on
  r3d_18 at 16x64x64, batch 2: at most 1 per step in fp32 and bf16 (the finite guard's), 3 in fp16 (the
  guard's loss check, torch's overflow check in the scaler's step and fastai's record of the scale);
  also the seconds a step;
- ``loss``: ``Cov3dLoss`` on the GPU equals the CPU value (1e-6) and a bad target stops the process
  with a device-side assertion, not a wrong loss;
- ``launch``: ``LOCAL_RANK`` equal to the visible GPUs is refused in one line;
- ``evaluation``: post-training logits in the run's precision: bf16 differs from fp32 by rounding only.

    python scripts/device_check_ddp.py                  # every group
    python scripts/device_check_ddp.py --only syncs     # some groups
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

GROUP_TIMEOUT_S = 240
SIZE = (16, 64, 64)
STEPS = 6


class Skip(Exception):
    """A group this machine cannot run."""


def cuda():
    import torch

    if not torch.cuda.is_available():
        raise Skip("needs a CUDA GPU")
    return torch.device("cuda", 0)


def check_syncs() -> tuple[bool, str]:
    import torch
    from fastai.callback.core import Callback
    from fastai.callback.progress import ProgressCallback
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset

    from cov3d.model.loss import Cov3dLoss
    from cov3d.model.metrics import task_metrics
    from cov3d.model.network import build_model
    from cov3d.settings import TrainSettings
    from cov3d.training.callbacks import FiniteGuard, OneCycleSchedule
    from cov3d.training.distributed import SINGLE_PROCESS
    from cov3d.training.optimizer import optimizer_function
    from cov3d.training.precision import precision_callbacks
    from cov3d.training.progress import EpochLines
    from cov3d.training.validation import record_on_device

    device = cuda()

    class Waits(Callback):
        """Counts CUDA's synchronisation warnings from the first callback's before_batch to the last's after_batch."""

        order = -100

        def before_batch(self) -> None:
            if self.training:
                self.started, self.caught = time.perf_counter(), warnings.catch_warnings(record=True)
                self.records = self.caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    class WaitsEnd(Callback):
        order = 1000

        def __init__(self, waits: Waits, counts: list, seconds: list):
            self.waits, self.counts, self.seconds = waits, counts, seconds

        def after_batch(self) -> None:
            if self.training:
                torch.cuda.set_sync_debug_mode("default")
                self.waits.caught.__exit__(None, None, None)
                torch.cuda.synchronize()
                self.seconds.append(time.perf_counter() - self.waits.started)
                self.counts.append(sum("synchronizing" in str(w.message) for w in self.waits.records))

    results = []
    for name, dtype, allowed in (("fp32", None, 1), ("bf16", torch.bfloat16, 1), ("fp16", torch.float16, 3)):
        torch.manual_seed(0)
        volumes = torch.rand(2 * STEPS, 1, *SIZE)
        targets = torch.tensor([[0, 0], [1, 2], [1, 0], [1, 4]] * (STEPS // 2), dtype=torch.float32)
        dls = DataLoaders.from_dsets(TensorDataset(volumes, targets), TensorDataset(volumes[:4], targets[:4]),
                                     bs=2, device=device)
        model = build_model(outputs=6, penultimate=16, pretrained_weights=None)
        settings = TrainSettings(epochs=1)
        waits, counts, seconds = Waits(), [], []
        guard = FiniteGuard(run_dir=Path("."), epochs=1, first_epoch=0, precision=name, learning_rate=1e-4,
                            check_gradients=dtype != torch.float16)
        learner = Learner(dls, model, loss_func=Cov3dLoss(severity_factor=0.5).to(device), metrics=task_metrics(0.5),
                          opt_func=optimizer_function(settings.optimizer, model, settings.weight_decay), wd=None,
                          cbs=[*precision_callbacks(device, dtype), OneCycleSchedule(settings), guard, waits,
                               WaitsEnd(waits, counts, seconds)])
        learner.remove_cb(ProgressCallback)
        learner.add_cb(EpochLines(0, 1))
        record_on_device(learner, SINGLE_PROCESS, device)
        with redirect_stdout(io.StringIO()):
            learner.fit(1, lr=1e-4, wd=None)
        steady = counts[1:]  # the first step also runs kernel probes and allocations
        results.append((name, max(steady) <= allowed, f"{name} waits/step {steady} (allowed {allowed}), "
                        f"{sum(seconds[1:]) / len(seconds[1:]):.3f} s/step"))
    return all(ok for _, ok, _ in results), "; ".join(text for _, _, text in results)


def check_loss() -> tuple[bool, str]:
    import torch

    from cov3d.model.loss import Cov3dLoss

    device = cuda()
    torch.manual_seed(0)
    logits = torch.randn(64, 6)
    targets = torch.tensor([[0, 0], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [0, 0], [1, 2]] * 8, dtype=torch.float32)
    loss = Cov3dLoss(severity_factor=0.5, presence_weights=[1.0, 2.0], severity_weights=[1, 0.5, 1.5, 1, 2, 1])
    on_cpu = float(loss(logits, targets))
    on_gpu = float(loss.to(device)(logits.to(device), targets.to(device)))
    same = abs(on_cpu - on_gpu) <= 1e-6 * abs(on_cpu)
    script = ("import torch; from cov3d.model.loss import Cov3dLoss; "
              "print(float(Cov3dLoss().cuda()(torch.zeros(1, 6).cuda(), torch.tensor([[0., 3.]]).cuda())))")
    bad = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    refused = bad.returncode != 0 and "assert" in bad.stderr.lower()
    return same and refused, f"cpu {on_cpu:.7f} gpu {on_gpu:.7f}; bad target refused: {refused}"


def check_launch() -> tuple[bool, str]:
    import torch

    from cov3d.errors import Cov3dError
    from cov3d.training.distributed import Distributed
    from cov3d.training.launch import check_launch as launch

    cuda()
    count = torch.cuda.device_count()
    dist = Distributed(rank=count, local_rank=count, world_size=count + 1, local_world_size=count + 1)
    try:
        launch(dist, "cuda", {})
    except Cov3dError as error:
        return "\n" not in str(error), str(error)
    return False, f"LOCAL_RANK={count} with {count} GPU(s) was accepted"


def check_evaluation() -> tuple[bool, str]:
    import torch

    from cov3d.model.network import build_model
    from cov3d.training.run_figures import validation_logits

    device = cuda()
    torch.manual_seed(0)
    model = build_model(outputs=6, penultimate=16, pretrained_weights=None).to(device)
    loader = [(torch.rand(2, 1, *SIZE), torch.zeros(2, 2)) for _ in range(2)]
    full, _ = validation_logits(model, loader, device)
    reduced, _ = validation_logits(model, loader, device, torch.bfloat16)
    gap = float((full - reduced).abs().max())
    return 0 < gap < 0.1 * float(full.abs().max()) + 1e-3, f"max |fp32 - bf16| logit {gap:.4f}"


CHECKS = {"syncs": check_syncs, "loss": check_loss, "launch": check_launch, "evaluation": check_evaluation}


def run_group(name: str) -> None:
    """Run one group in this process and print its line."""
    started = time.perf_counter()
    try:
        ok, text = CHECKS[name]()
        status = "ok  " if ok else "FAIL"
    except Skip as reason:
        status, text = "skip", str(reason)
    except Exception as error:  # noqa: BLE001 - any failure of a check is its FAIL line
        status, text = "FAIL", " ".join(f"{type(error).__name__}: {error}".split())
    print(f"{status} {name}: {text} [{time.perf_counter() - started:.0f} s]", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CHECKS), help=f"groups, comma-separated: {', '.join(CHECKS)}")
    parser.add_argument("--group", help=argparse.SUPPRESS)  # one group in this process (used by the others)
    args = parser.parse_args()
    if args.group:
        run_group(args.group)
        return 0
    failed = False
    for name in args.only.split(","):
        if name not in CHECKS:
            parser.error(f"unknown group {name!r}; choose from {', '.join(CHECKS)}")
        try:
            done = subprocess.run([sys.executable, __file__, "--group", name], capture_output=True, text=True,
                                  timeout=GROUP_TIMEOUT_S)
            line = next((text for text in done.stdout.splitlines() if text[:4] in ("ok  ", "FAIL", "skip")),
                        f"FAIL {name}: exit {done.returncode}: {' '.join(done.stderr.split()[-30:])}")
        except subprocess.TimeoutExpired:
            line = f"FAIL {name}: over {GROUP_TIMEOUT_S} s"
        print(line, flush=True)
        failed |= line.startswith("FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
