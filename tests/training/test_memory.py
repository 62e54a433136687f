"""The memory estimate of a training step (activations saved for backward, counted on the meta device) and the
check before the first step on a GPU, with CUDA's free memory mocked."""

import pytest
import torch
from torch import nn

from cov3d.errors import Cov3dError
from cov3d.settings import PRESETS, TrainSettings, VolumeShape
from cov3d.training import memory
from cov3d.training.memory import GIB, check_memory_fits, estimate_training_memory, saved_for_backward


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_saved_bytes_of_a_small_network_computed_by_hand(device):
    """(B, 1, 2, 4, 4) fp32 -> Conv3d(1, 4) -> BatchNorm3d(4) -> in-place ReLU. Saved: the conv's input
    (B x 32 x 4 bytes), the conv's output that BatchNorm normalises (B x 128 x 4), the ReLU's output, which is
    BatchNorm's output changed in place (B x 128 x 4), and BatchNorm's batch mean and inverse std (2 x 4 x 4
    bytes); the weights and running statistics are the model's own, not counted."""
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(inplace=True)).to(device)
    for batch in (1, 3):
        saved, largest = saved_for_backward(model, torch.zeros(batch, 1, 2, 4, 4, device=device))
        assert saved == batch * (128 + 512 + 512) + 32
        assert largest == batch * 512


def test_a_large_bf16_step_at_batch_2_needs_about_17_to_19_gib():
    """The issue's independent estimate; reduced precision halves the activations (fp32: about twice)."""
    large = TrainSettings(shape=PRESETS["large"], batch_size=2)
    bf16, fp32 = estimate_training_memory(large, torch.bfloat16), estimate_training_memory(large, None)
    assert 17 <= bf16.total(2) / GIB <= 19
    assert 1.9 < fp32.saved_per_sample / bf16.saved_per_sample <= 2
    assert bf16.largest_batch(bf16.total(2)) == 2 and bf16.largest_batch(bf16.total(3) - 1) == 2
    assert bf16.largest_batch(bf16.total(0)) == 0


@pytest.fixture
def gpu_memory(monkeypatch):
    free = {"bytes": 100 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 * GIB))
    monkeypatch.delenv(memory.MEMORY_CHECK_ENV, raising=False)
    return free


def test_a_batch_that_does_not_fit_is_refused_before_the_first_step(gpu_memory, monkeypatch):
    cuda = torch.device("cuda", 0)
    settings = TrainSettings(shape=PRESETS["large"], batch_size=4)
    check_memory_fits(settings, torch.bfloat16, cuda)  # about 36 GiB of 100 free
    estimate = estimate_training_memory(settings, torch.bfloat16)
    gpu_memory["bytes"] = estimate.total(2, context=False) + 1
    with pytest.raises(Cov3dError, match=r"`batch_size=4` in bf16 needs an estimated .* GiB free of 141\.0: use `batch_size=2`"):
        check_memory_fits(settings, torch.bfloat16, cuda)
    gpu_memory["bytes"] = estimate.total(1, context=False) - 1
    with pytest.raises(Cov3dError, match="even one scan does not fit: use a smaller volume size"):
        check_memory_fits(settings, torch.bfloat16, cuda)
    monkeypatch.setenv(memory.MEMORY_CHECK_ENV, "0")
    check_memory_fits(settings, torch.bfloat16, cuda)
    check_memory_fits(settings, torch.bfloat16, torch.device("cpu"))


def test_training_checks_the_memory_before_its_first_step(monkeypatch, tiny_dataset, tmp_path):
    from cov3d.training import train as train_module

    asked = []

    def spy(settings, dtype, device):
        asked.append((settings.batch_size, dtype, device.type))
        raise Cov3dError("stop before the first step")

    monkeypatch.setattr(train_module, "check_memory_fits", spy)
    settings = TrainSettings(shape=VolumeShape(8, 32, 32), penultimate=8, epochs=1)
    with pytest.raises(Cov3dError, match="stop before the first step"):
        train_module.train(tiny_dataset, tmp_path / "run", settings, cache_dir=tmp_path / "cache", pretrained=False,
                           device="cpu", precision="fp32", workers=1)
    assert asked == [(2, None, "cpu")]


def test_the_script_prints_the_estimate_of_the_package(monkeypatch, capsys):
    from scripts_loader import load_script

    monkeypatch.setattr("sys.argv", ["estimate_memory.py", "--size", "8x32x32"])
    load_script("estimate_memory").main()
    rows = capsys.readouterr().out.splitlines()
    estimate = estimate_training_memory(TrainSettings(shape=VolumeShape(8, 32, 32)), torch.bfloat16)
    assert rows[3].startswith(f"| 8x32x32 | bf16 / fp16 | {estimate.per_sample / GIB:.2f} | {estimate.total(2) / GIB:.1f} |")
