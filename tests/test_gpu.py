"""GPU start-up checks with CUDA mocked: the wheel's architecture list against the GPU, CUDA that does not start,
and ``--device auto`` that stops instead of training on the CPU where a GPU was expected."""

import pytest
import torch

from cov3d import runtime as gpu
from cov3d.errors import Cov3dError
from cov3d.runtime import Precision, choose_precision, resolve_device

CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130's list
CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(("capability", "arch", "runs"), [
    ((7, 0), "sm_70", True),
    ((7, 5), "sm_70", True),  # same major, later minor
    ((8, 0), "sm_86", False),  # an earlier minor cannot run later binaries
    ((8, 0), "sm_75", False),  # nor another major
    ((9, 0), "sm_90a", True),
    ((9, 1), "sm_90a", False),  # architecture-specific: 9.0 only
    ((12, 1), "compute_120", True),  # PTX is compiled for later GPUs
    ((10, 0), "compute_120", False),
    ((9, 0), "compute_70", True),
    ((9, 0), "gfx90a", False),
])
def test_which_kernels_run_on_which_gpu(capability, arch, runs):
    assert gpu.runs_on(capability, arch) is runs


def test_the_default_wheel_has_no_kernels_for_a_v100():
    assert "none for compute capability 7.0" in gpu.arch_mismatch((7, 0), CU130_ARCHS)
    assert gpu.arch_mismatch((7, 0), CU126_ARCHS) is None
    assert gpu.arch_mismatch((8, 9), CU130_ARCHS) is None  # an L4 runs sm_86
    assert gpu.arch_mismatch((6, 1), []) is None  # a build that lists nothing is not judged


@pytest.fixture
def one_gpu(monkeypatch):
    """CUDA answered as on a machine with one GPU of capability `state['capability']`."""
    state = {"capability": (7, 0), "archs": CU130_ARCHS}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: state["archs"])
    return state


def test_a_gpu_without_kernels_in_this_torch_is_refused_with_what_to_install(one_gpu):
    with pytest.raises(Cov3dError, match=r"V100.*none for compute capability 7\.0.*whl/cu126") as error:
        resolve_device("auto")
    assert "\n" not in str(error.value)
    one_gpu["archs"] = CU126_ARCHS
    assert resolve_device("cuda") == torch.device("cuda", 0)


@pytest.fixture
def no_cuda(monkeypatch):
    """CUDA does not start; no Slurm GPU variables and no device files unless a test adds them."""
    for name in gpu.SLURM_GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    files: list[str] = []
    monkeypatch.setattr(gpu.glob, "glob", lambda pattern: [f for f in files if f.startswith(pattern.split("[")[0])])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def old_driver():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12020).\nPlease update it.")

    monkeypatch.setattr(torch.cuda, "init", old_driver)
    return files


def test_auto_means_the_cpu_on_a_plain_cpu_machine(no_cuda):
    assert gpu.expected_gpu() is None
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_stops_where_the_driver_and_a_cuda_torch_are_installed(no_cuda, monkeypatch):
    no_cuda.append("/dev/nvidia0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(Cov3dError) as error:
        resolve_device("auto")
    message = str(error.value)
    assert "NVIDIA device files (/dev/nvidia0)" in message and "driver on your system is too old" in message
    assert "under torchrun every process would train on the CPU" in message and "whl/cu126" in message
    assert "\n" not in message
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch on that machine: the CPU is what it can do
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_stops_where_slurm_allocated_gpus(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("SLURM_TRES_PER_TASK", "cpu=4")  # not a GPU request
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1")
    with pytest.raises(Cov3dError, match=r"Slurm allocated GPUs \(SLURM_JOB_GPUS=0,1\).*built without CUDA"):
        resolve_device("auto")


def test_auto_stops_when_no_gpu_is_visible(no_cuda, monkeypatch):
    no_cuda.append("/dev/nvidiactl")
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(Cov3dError, match=r"no GPU is visible \(CUDA_VISIBLE_DEVICES=''\)"):
        resolve_device("auto")
    with pytest.raises(Cov3dError, match="--device cuda was asked for but CUDA cannot start"):
        resolve_device("cuda")


@pytest.mark.parametrize(("capability", "refused"), [((7, 0), True), ((7, 5), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_is_refused_below_compute_capability_8(one_gpu, capability, refused):
    one_gpu["capability"] = capability
    device = torch.device("cuda", 0)
    if refused:
        with pytest.raises(Cov3dError, match=r"`precision=bf16` on Tesla V100.*no bf16 convolutions.*`precision=fp16`"):
            choose_precision("bf16", device)
    else:
        assert choose_precision("bf16", device) == Precision(torch.bfloat16, "asked for")


def test_a_bf16_run_resumed_below_compute_capability_8_says_it_continues_in_fp16(one_gpu):
    choice = choose_precision("bf16", torch.device("cuda", 0), resumed=True)
    assert choice.dtype == torch.float16 and choice.name == "fp16"
    assert "the run trained in bf16" in choice.reason and "new gradient scaler" in choice.reason


def test_training_tells_the_precision_rule_whether_it_resumes(monkeypatch, tmp_path):
    from cov3d.settings import TrainSettings
    from cov3d.training import train as train_module

    asked = []

    def spy(precision, device, resumed=False):
        asked.append((precision, device.type, resumed))
        raise Cov3dError("stop here")

    monkeypatch.setattr(train_module, "choose_precision", spy)
    for resume in (False, True):
        with pytest.raises(Cov3dError, match="stop here"):
            train_module.train(tmp_path, tmp_path / "run", TrainSettings(), cache_dir=tmp_path, device="cpu",
                               precision="bf16", resume=resume)
    assert asked == [("bf16", "cpu", False), ("bf16", "cpu", True)]
