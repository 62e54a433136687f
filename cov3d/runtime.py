"""The one place that resolves devices and numeric precision; everything else follows tensors. A GPU is
checked before use (kernels in this torch for it, CUDA starting), and ``auto`` never means the CPU where a
GPU was expected."""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cov3d.errors import Cov3dError, one_line

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
"""A run's autocast dtype (None: plain fp32) -> its name: the ``--precision`` that gives it, and what
config.json records (``precision``), so that a resumed run keeps it."""
CPU_BF16_FLAGS = {"amx_bf16": "AMX-BF16 tiles", "avx512_bf16": "AVX-512 BF16 instructions"}
"""x86 CPU features (from /proc/cpuinfo) with which oneDNN runs bf16 natively, faster than fp32."""
ONEDNN_ISA_FOR_FLAG = {"amx_bf16": "AVX512_CORE_AMX", "avx512_bf16": "AVX512_CORE_BF16"}
"""The lowest ``ONEDNN_MAX_CPU_ISA`` at which oneDNN may use each feature of ``CPU_BF16_FLAGS``."""
ONEDNN_ISA_RANKS = {
    name: rank for rank, names in enumerate([
        ("SSE41",), ("AVX",), ("AVX2",), ("AVX2_VNNI",), ("AVX2_VNNI_2",), ("AVX512_CORE",), ("AVX512_CORE_VNNI",),
        ("AVX512_CORE_BF16",), ("AVX10_1_512", "AVX512_CORE_FP16"), ("AVX512_CORE_AMX",), ("AVX10_1_512_AMX",),
        ("AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"), ("AVX10_2_512",), ("AVX10_2_512_AMX_2",), ("DEFAULT", "ALL"),
    ]) for name in names
}
"""oneDNN's x86 ``ONEDNN_MAX_CPU_ISA`` values (and their aliases) ranked from the lowest ISA to the highest."""
CUDA_NATIVE_BF16 = (8, 0)
"""CUDA compute capability from which GPUs have bf16 tensor cores (Ampere); older ones emulate bf16."""


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None for plain fp32), its name and why it was chosen."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return PRECISION_NAMES[self.dtype]


# GPU start-up ----------------------------------------------------------------------------------------
# A torch wheel carries compiled kernels for a list of GPU architectures (``torch.cuda.get_arch_list()``):
# ``sm_XY`` binaries run on compute capability X.Y and later minors of the same major (sm_80 on an 8.6 GPU),
# ``sm_XYa`` only on X.Y itself, and ``compute_XY`` (PTX) is compiled by the driver for any capability from
# X.Y on. A GPU outside the list fails at its first kernel ("no kernel image is available"); the default
# wheel (CUDA 13) has no Volta (V100, sm_70) kernels and needs a driver >= 580.

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


def resolve_device(name: str = "auto") -> torch.device:
    """Turn 'auto' | 'cpu' | 'cuda' (or 'cuda:N') into a device, checking that it exists.

    A GPU comes back with its index ('cuda' is the current GPU) and becomes torch's current CUDA
    device: whatever asks "the current GPU" (bf16 support, the saved CUDA RNG state, the pinned-memory
    thread of the loaders, ``torch.cuda.*`` calls without a device) then means the one chosen.
    'auto' is the CPU only where no GPU is expected (``expected_gpu``); a GPU must have kernels
    in this torch and start (``check_gpu_runs``), else a one-line error says what to install.
    """
    if name == "auto":
        if not torch.cuda.is_available() and (reason := expected_gpu()) is not None:
            raise refuse_silent_cpu(reason)
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise Cov3dError(f"Unknown device '{name}'; choose one of {', '.join(DEVICES)} (or cuda:N).")
    if not torch.cuda.is_available():
        raise Cov3dError(f"--device {name} was asked for but CUDA cannot start ({cuda_start_failure() or 'no GPU'}): "
                         f"{INSTALL_ADVICE}.")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise Cov3dError(f"Unknown device '{name}'; use cuda or cuda:N.") from error
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if device.index >= count:
        raise Cov3dError(f"--device {name}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1}).")
    torch.cuda.set_device(device)
    check_gpu_runs(device)
    return device


CUBLAS_WORKSPACE_CONFIG = ":4096:8"
"""cuBLAS workspace setting under which its kernels are deterministic (CUDA >= 10.2)."""


def kernel_choice(device: torch.device, deterministic: bool) -> str:
    """Make torch pick deterministic kernels on `device`, or the fastest ones, and say what that means.

    Deterministic: deterministic cuDNN algorithms (no autotuning), ``torch.use_deterministic_algorithms``
    (warning about operations that have no deterministic kernel rather than failing; it also fills every
    new tensor's memory) and, on GPUs, cuBLAS's deterministic workspace (``CUBLAS_WORKSPACE_CONFIG``,
    unless already set). Not deterministic: cuDNN autotuning (``cudnn.benchmark``: the fastest
    algorithm for each convolution shape, timed at its first call) and any kernel. Training and
    ``scripts/benchmark_train.py`` both call this, so benchmarks time the kernels training runs.
    """
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if not deterministic:
        return ("fastest kernels (--no-deterministic): cuDNN autotuning and non-deterministic kernels, so runs with "
                "the same seed differ in the last digits and then beyond")
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
        return ("deterministic cuDNN and cuBLAS kernels: the same seed on the same GPU model, number of processes "
                "and software versions gives the same run, except through an operation torch warns has no "
                "deterministic CUDA kernel")
    return "deterministic kernels: the same seed and number of threads gives the same run"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty off Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text(errors="ignore").split()) if cpuinfo.exists() else set()


def onednn_allows(flag: str) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (when set) lets oneDNN use the bf16 feature `flag`.

    Capping the ISA (``ONEDNN_MAX_CPU_ISA=AVX2``, as on a CPU without AVX-512) turns native bf16 off
    for oneDNN, so a run on such a capped CPU is an AVX2-only machine as far as bf16 goes.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap not in ONEDNN_ISA_RANKS:  # unset, or a value oneDNN ignores
        return True
    return ONEDNN_ISA_RANKS[cap] >= ONEDNN_ISA_RANKS[ONEDNN_ISA_FOR_FLAG[flag]]


def cpu_bf16_features() -> list[str]:
    """The native-bf16 features this CPU advertises and oneDNN may use (empty off Linux/x86 or without them)."""
    flags = cpu_flags()
    return [name for flag, name in CPU_BF16_FLAGS.items() if flag in flags and onednn_allows(flag)]


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s, from /proc/cpuinfo), or what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text(errors="ignore").splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: torch.device) -> str:
    """What a run's speed depends on: the GPU and its compute capability, or the CPU, its threads and
    its native bf16 features ('CPU AMD EPYC (2 threads; native bf16: AVX-512 BF16 instructions)')."""
    if device.type == "cuda":
        return f"GPU {gpu_description(device)}"
    features = " and ".join(cpu_bf16_features()) or "none"
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads; native bf16: {features})"


def choose_precision(precision: str, device: torch.device, resumed: bool = False) -> Precision:
    """The autocast dtype for `precision` on `device`, with the reason.

    'auto': on a CPU, bf16 when it has AMX-BF16 or AVX-512 BF16 and torch has oneDNN, else fp32 (bf16
    would be emulated, slower than fp32); on a CUDA GPU, bf16 from compute capability 8.0, else fp16
    with a gradient scaler. Asked for explicitly, any of fp32, bf16 and fp16 (CUDA only) is used as is,
    except bf16 on a GPU below compute capability 8.0: refused, or (a `resumed` run) replaced by fp16.
    """
    if precision not in PRECISIONS:
        raise Cov3dError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return Precision(None, "asked for")
    if precision == "fp16":
        if device.type != "cuda":
            raise Cov3dError("`precision=fp16` needs a CUDA GPU; use bf16 or fp32 on a CPU.")
        return Precision(torch.float16, "asked for")
    if precision == "bf16":
        if device.type == "cuda" and (capability := torch.cuda.get_device_capability(device)) < CUDA_NATIVE_BF16:
            return bf16_below_ampere(gpu_description(device, capability), resumed)
        return Precision(torch.bfloat16, "asked for")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        gpu = gpu_description(device, capability)
        if capability >= CUDA_NATIVE_BF16:
            return Precision(torch.bfloat16, f"auto: {gpu} has native bf16")
        return Precision(torch.float16, f"auto: {gpu} has no native bf16; fp16 with a gradient scaler")
    features = cpu_bf16_features()
    if features and torch.backends.mkldnn.is_available():
        return Precision(torch.bfloat16, f"auto: the CPU has {' and '.join(features)}")
    if features:
        return Precision(None, "auto: this torch has no oneDNN, so bf16 would be slower")
    if cpu_flags() & set(CPU_BF16_FLAGS):
        capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip()
        return Precision(None, f"auto: ONEDNN_MAX_CPU_ISA={capped} keeps oneDNN from the CPU's bf16 instructions")
    return Precision(None, "auto: the CPU has no native bf16 (AMX-BF16 or AVX-512 BF16), so bf16 would be slower")


def gpu_description(device: torch.device, capability: tuple[int, int] | None = None) -> str:
    """'NVIDIA H200 (compute capability 9.0)' (`capability`: the device's, when already asked)."""
    major, minor = capability or torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def bf16_below_ampere(gpu: str, resumed: bool) -> Precision:
    """bf16 asked for on a GPU below compute capability 8.0, where cuDNN has no bf16 convolutions: every
    Conv3d would fall to an unfold kernel: one layer1 convolution at 160x320x320 unfolds 64 channels x 27 taps x
    160^3 voxels, 14 GB of bf16 per sample.
    Refused; a resumed bf16 run continues in fp16 with a new gradient scaler (what 'auto' picks there)."""
    if resumed:
        return Precision(torch.float16, f"the run trained in bf16, which {gpu} lacks (no cuDNN bf16 convolutions): "
                                        "continuing in fp16 with a new gradient scaler, as --precision auto does here")
    raise Cov3dError(
        f"`precision=bf16` on {gpu}: cuDNN has no bf16 convolutions below compute capability 8.0, so every Conv3d "
        "would fall to a slow unfold kernel (about 14 GB per sample for one layer1 convolution at 160x320x320). "
        "Use `precision=fp16` (what auto picks on this GPU) or `precision=fp32`.")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``choose_precision`` (None for plain fp32)."""
    return choose_precision(precision, device).dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """An autocast context for `dtype` on `device`; a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(dtype: torch.dtype | None) -> bool:
    """Whether to use the channels-last 3D memory format: it pays off with reduced precision."""
    return dtype is not None
