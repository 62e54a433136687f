"""The one place that resolves devices and numeric precision; everything else follows tensors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cov3d.errors import Cov3dError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU features (from /proc/cpuinfo) that make bf16 autocast faster than fp32 on x86."""


def resolve_device(name: str = "auto") -> torch.device:
    """Turn 'auto' | 'cpu' | 'cuda' (or 'cuda:N') into a device, checking that it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Cov3dError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto.")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise Cov3dError(f"Unknown device '{name}'; choose one of {', '.join(DEVICES)}.")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises native bf16 arithmetic (AMX or AVX-512 BF16)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    flags = set(cpuinfo.read_text(errors="ignore").split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.

    'auto' picks bf16 on GPUs that support it and on CPUs with native bf16, else fp32.
    """
    if precision not in PRECISIONS:
        raise Cov3dError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise Cov3dError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU.")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """An autocast context for `dtype` on `device`; a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(dtype: torch.dtype | None) -> bool:
    """Whether to use the channels-last 3D memory format: it pays off with reduced precision."""
    return dtype is not None
