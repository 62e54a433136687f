"""Checks that a CUDA GPU can run this torch before a run starts on it, and that ``--device auto`` never
falls back to the CPU where a GPU was expected.

A torch wheel carries compiled kernels for a list of GPU architectures (``torch.cuda.get_arch_list()``):
``sm_XY`` binaries run on compute capability X.Y and later minors of the same major (sm_80 on an 8.6
GPU), ``sm_XYa`` only on X.Y itself, and ``compute_XY`` (PTX) is compiled by the driver for any
capability from X.Y on. A GPU outside the list fails at its first kernel ("no kernel image is
available"); the default wheel (CUDA 13) has no Volta (V100, sm_70) kernels and needs a driver >= 580.
"""

from __future__ import annotations

import glob
import os
import re

import torch

from cov3d.errors import Cov3dError, one_line

OLDER_GPU_INSTALL = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126"
"""The CUDA 12.6 build of torch: kernels for compute capability 5.0 to 9.0 (V100 included), drivers from 525 on."""
INSTALL_ADVICE = (f"install the CUDA 12.6 build of torch for this GPU or driver ({OLDER_GPU_INSTALL}; see docs/gpu.md), "
                  "or give --device cpu")
SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_PER_NODE",
                       "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK")
"""Variables Slurm sets when the job or step asked for GPUs (``--gpus``, ``--gres=gpu:N``, ...)."""
NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*")
"""Device files the NVIDIA driver creates on a machine with its GPUs."""
ARCH_PATTERN = re.compile(r"^(sm|compute)_(\d+)([a-z]?)$")


def runs_on(capability: tuple[int, int], arch: str) -> bool:
    """Whether kernels built for ``arch`` (an entry of ``torch.cuda.get_arch_list()``: sm_70, sm_90a,
    compute_120) run on a GPU of compute capability ``capability`` (major, minor)."""
    match = ARCH_PATTERN.match(arch)
    if match is None:
        return False
    kind, digits, suffix = match.groups()
    built = divmod(int(digits), 10)
    if kind == "compute":  # PTX: the driver compiles it for this GPU
        return capability >= built
    if suffix == "a":  # architecture-specific features: that capability only
        return capability == built
    return capability[0] == built[0] and capability[1] >= built[1]


def arch_mismatch(capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """Why this torch's kernels cannot run on a GPU of ``capability`` (None: some can, or the build lists none)."""
    if not arch_list or any(runs_on(capability, arch) for arch in arch_list):
        return None
    return (f"this torch {torch.__version__} (CUDA {torch.version.cuda}) has kernels for {' '.join(arch_list)} only, "
            f"none for compute capability {capability[0]}.{capability[1]}")


def cuda_start_failure() -> str | None:
    """Why CUDA cannot start in this process (the driver's or torch's own words), or None when it starts."""
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is built without CUDA"
    try:
        torch.cuda.init()
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, AssertionError or others here
        return one_line(error)[:300]
    if torch.cuda.device_count() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no GPU is visible" + (f" (CUDA_VISIBLE_DEVICES='{visible}')" if visible is not None else "")
    return None


def expected_gpu() -> str | None:
    """Why a GPU is expected on this machine (None: nothing says so, a plain CPU machine): Slurm allocated
    GPUs, or this torch is built for CUDA and the NVIDIA driver's device files exist."""
    for name in SLURM_GPU_VARIABLES:
        value = os.environ.get(name, "")
        if value and (name != "SLURM_TRES_PER_TASK" or "gpu" in value) and value != "0":
            return f"Slurm allocated GPUs ({name}={value})"
    files = sorted({path for pattern in NVIDIA_DEVICE_FILES for path in glob.glob(pattern)})
    if torch.version.cuda is not None and files:
        return f"this torch is built for CUDA {torch.version.cuda} and the machine has NVIDIA device files ({files[0]})"
    return None


def refuse_silent_cpu(reason: str) -> Cov3dError:
    """The error for ``--device auto`` when a GPU was expected (``reason``) and CUDA cannot start."""
    failure = cuda_start_failure() or "torch.cuda.is_available() is False"
    launched = " (under torchrun every process would train on the CPU)" if "LOCAL_RANK" in os.environ else ""
    return Cov3dError(f"--device auto: a GPU was expected ({reason}) but CUDA cannot start: {failure}; not falling back "
                      f"to the CPU{launched}. Fix the driver or CUDA_VISIBLE_DEVICES, {INSTALL_ADVICE}.")


def check_gpu_runs(device: torch.device) -> None:
    """Refuse a GPU that this torch has no kernels for, or on which CUDA does not start, in one line that
    says what to install."""
    failure = cuda_start_failure()
    if failure is not None:
        raise Cov3dError(f"{device}: CUDA cannot start ({failure}): {INSTALL_ADVICE}.")
    capability = torch.cuda.get_device_capability(device)
    mismatch = arch_mismatch(capability, torch.cuda.get_arch_list())
    if mismatch is not None:
        raise Cov3dError(f"{device} ({torch.cuda.get_device_name(device)}): {mismatch}; {INSTALL_ADVICE}.")
