"""Training that stays finite on every CPU: checked bf16 convolutions, the precision rule and the guard
that stops a run at its first non-finite loss or gradient."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from cpu_kinds import BF16_BATCH, BF16_SLICE
from torch import nn

from cov3d.errors import Cov3dError, NonFiniteTraining
from cov3d.model.loss import Cov3dLoss, class_weights
from cov3d.model.network import build_model
from cov3d.runtime import choose_precision
from cov3d.settings import VolumeShape
from cov3d.synthetic.generator import generate_dataset
from cov3d.training import bf16_convs
from cov3d.training.bf16_convs import (
    bf16_weight_grad_is_right,
    checked_bf16_convs,
    conv_geometry,
    depth_padded,
)
from cov3d.training.train import TrainSettings, train
from cov3d.workflows.demo import DemoReport, DemoSettings, check_beats_baseline

DEPTH_TWO_INPUT = (4, 64, 2, 8, 8)
"""A (B, C, D, H, W) conv input two slices deep: oneDNN's AVX-512 BF16 (non-AMX) backward-weights kernel
returns garbage for it (relative errors 1 to 1e36), as layer4 sees at the demo's 16-slice volumes."""


def reference_weight_grad(conv: nn.Conv3d, volume: torch.Tensor, out_grad: torch.Tensor) -> torch.Tensor:
    """d(Σ out_grad·conv(volume))/d(weight) in float64 from the bf16-rounded tensors: an independent route."""
    weight = conv.weight.detach().bfloat16().double().requires_grad_()
    output = nn.functional.conv3d(volume.bfloat16().double(), weight, None, conv.stride, conv.padding)
    output.backward(out_grad.bfloat16().double())
    return weight.grad


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("channels_last", [False, True])
def test_checked_conv_weight_grad_is_right_two_slices_deep(channels_last):
    """The geometry that broke the demo on AMD Zen 4: within checked_bf16_convs the weight gradient under
    CPU bf16 autocast agrees with float64, call after call (without the check it did not on that CPU)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(64, 64, 3, padding=1, bias=False)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv.to(memory_format=memory_format)
    volume = torch.randn(DEPTH_TWO_INPUT).contiguous(memory_format=memory_format)
    out_grad = torch.randn(DEPTH_TWO_INPUT)
    reference = reference_weight_grad(conv, volume, out_grad)
    with checked_bf16_convs(conv):
        for _ in range(3):
            conv.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = conv(volume)
            output.backward(out_grad.bfloat16())
            assert relative_error(conv.weight.grad, reference) < 0.02
    assert "forward" not in vars(conv)  # the module is given back unchanged


def test_a_wrong_kernel_is_caught_and_bypassed(monkeypatch):
    """On any CPU: a bf16 weight gradient that is garbage at every depth fails the probe, the depth-padded
    route fails too, and that geometry's weight gradient is then computed in fp32 and agrees with float64."""
    real = bf16_convs._weight_grad

    def broken_in_bf16(volume, weight, out_grad, conv):
        grad = real(volume, weight, out_grad, conv)
        return grad * 1e30 if volume.dtype == torch.bfloat16 else grad

    monkeypatch.setattr(bf16_convs, "_weight_grad", broken_in_bf16)
    monkeypatch.setattr(bf16_convs, "_verdicts", {})
    torch.manual_seed(1)
    conv = nn.Conv3d(8, 8, 3, padding=1, bias=False)
    volume, out_grad = torch.randn(2, 8, 2, 4, 4), torch.randn(2, 8, 2, 4, 4)
    geometry = conv_geometry(volume, conv)
    assert not bf16_weight_grad_is_right(geometry, conv)
    assert not bf16_weight_grad_is_right(*depth_padded(geometry, conv))

    calls = []
    monkeypatch.setattr(bf16_convs, "_weight_grad", lambda volume, *rest: calls.append(volume.dtype) or real(volume, *rest))
    monkeypatch.setattr(bf16_convs, "_verdicts", {geometry: False})
    monkeypatch.setattr(bf16_convs, "_padded_verdicts", {geometry: False})
    with checked_bf16_convs(conv), torch.autocast("cpu", dtype=torch.bfloat16):
        output = conv(volume)
    output.backward(out_grad.bfloat16())
    assert calls == [torch.float32]  # the weight gradient came from the fp32 route
    assert output.dtype == torch.bfloat16
    assert conv.weight.grad.dtype == torch.float32
    assert relative_error(conv.weight.grad, reference_weight_grad(conv, volume, out_grad)) < 0.02


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_kernel_wrong_only_two_slices_deep_is_bypassed_by_explicit_depth_padding(monkeypatch, channels_last):
    """On any CPU: a bf16 weight gradient that is garbage only for inputs two slices deep (as on AMD Zen 4)
    is computed in bf16 on the input padded with its zero slices (four deep), and agrees with float64."""
    real = bf16_convs._weight_grad
    calls = []

    def broken_two_deep(volume, weight, out_grad, conv):
        calls.append((volume.dtype, volume.shape[2]))
        grad = real(volume, weight, out_grad, conv)
        return grad * 1e30 if volume.dtype == torch.bfloat16 and volume.shape[2] == 2 else grad

    monkeypatch.setattr(bf16_convs, "_weight_grad", broken_two_deep)
    monkeypatch.setattr(bf16_convs, "_verdicts", {})
    monkeypatch.setattr(bf16_convs, "_padded_verdicts", {})
    torch.manual_seed(2)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv = nn.Conv3d(8, 8, 3, padding=1, bias=False).to(memory_format=memory_format)
    volume = torch.randn(2, 8, 2, 4, 4).contiguous(memory_format=memory_format)
    out_grad = torch.randn(2, 8, 2, 4, 4)
    with checked_bf16_convs(conv), torch.autocast("cpu", dtype=torch.bfloat16):
        output = conv(volume)
    calls.clear()
    output.backward(out_grad.bfloat16())
    assert calls == [(torch.bfloat16, 4)]  # one bf16 weight gradient, on the padded input
    geometry = conv_geometry(volume, conv)
    assert (bf16_convs._verdicts[geometry], bf16_convs._padded_verdicts[geometry]) == (False, True)
    assert output.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
    assert relative_error(conv.weight.grad, reference_weight_grad(conv, volume, out_grad)) < 0.02


def test_probes_leave_the_training_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    conv = nn.Conv3d(4, 4, 3, padding=1, bias=False)
    torch.manual_seed(5)
    bf16_weight_grad_is_right(conv_geometry(torch.zeros(1, 4, 2, 4, 4), conv), conv)
    assert torch.equal(torch.rand(3), expected)


MAX_SANE_GRADIENT = 1e4
"""Far above any gradient of this network and loss (at most about 10 in fp32), far below the broken
kernel's (1e18 to 1e36); NaN and inf fail the comparison too."""


def blob_volumes(count: int, generator: torch.Generator, slice_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 1, 16, S, S) noise volumes, a bright cube in the positives' middle half; labels (count, 2)."""
    volumes = torch.rand(count, 1, 16, slice_size, slice_size, generator=generator) * 0.5
    has_covid = torch.arange(count) % 2
    quarter = slice_size // 4
    volumes[has_covid == 1, :, 4:12, quarter:3 * quarter, quarter:3 * quarter] += 0.5
    severity = has_covid * (1 + torch.arange(count) % 4)
    return volumes, torch.stack([has_covid, severity], dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, None], ids=["bf16", "fp32"])
def test_demo_network_trains_finite_and_learns(dtype):
    """The demo's network (16-slice volumes, so layer4 runs two slices deep) trained by Adam at the
    demo's learning rate for 20 steps: every loss finite, every gradient finite and of a sane size (the
    broken kernel's are up to 1e36 from the first step), the last steps' loss well below the first's.
    bf16 runs at BF16_SLICE and BF16_BATCH (small where bf16 is emulated)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    demo = DemoSettings().with_workload("bf16" if dtype else "fp32")
    settings = demo.train_settings()
    model = build_model(outputs=6, penultimate=demo.penultimate, dropout=demo.dropout, pool=settings.pool,
                        final_bias=settings.final_bias, pretrained_weights=None).to(memory_format=torch.channels_last_3d)
    volumes, targets = blob_volumes(8, generator, BF16_SLICE if dtype else 32)
    loss_func = Cov3dLoss(severity_factor=demo.severity_factor, presence_weights=class_weights([4, 4]),
                          severity_weights=class_weights([4, 1, 1, 1, 1, 0]),
                          presence_averaging=settings.presence_averaging)
    optimizer = torch.optim.Adam(model.parameters(), lr=demo.learning_rate)
    losses = []
    with checked_bf16_convs(model) if dtype else contextlib.nullcontext():  # fp32: the convolutions as trained
        for step in range(20):
            batch = torch.randperm(8, generator=generator)[:BF16_BATCH if dtype else 4]
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(volumes[batch].contiguous(memory_format=torch.channels_last_3d))
            loss = loss_func(logits.float(), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
            largest = float(torch.stack([p.grad.abs().max() for p in model.parameters()]).max())
            assert largest < MAX_SANE_GRADIENT, f"step {step}: a gradient reaches {largest}"
            optimizer.step()
            losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


@pytest.fixture(scope="module")
def guard_dataset(module_dir) -> Path:
    out = module_dir / "data"
    generate_dataset(out, scans=8, test_scans=0, seed=2, slice_size=32, depth_scale=0.05)
    return out


def tiny_settings(**changes) -> TrainSettings:
    return TrainSettings(shape=VolumeShape(8, 32, 32), batch_size=3, penultimate=8, **changes)


@pytest.mark.slow
def test_nan_loss_stops_the_run_in_that_step_and_resume_still_works(module_dir, guard_dataset, monkeypatch):
    """A NaN injected into epoch 2's second training loss: the run stops with a NonFiniteTraining that
    names epoch 2, batch 2 and the remedies; epoch 1's checkpoint and best weights stay byte for byte;
    --resume then finishes the run."""
    run = module_dir / "nan-run"
    common = dict(cache_dir=module_dir / "cache", pretrained=False, device="cpu", precision="fp32", workers=1)
    train(guard_dataset, run, tiny_settings(epochs=1), **common)
    kept = {path.name: path.read_bytes() for path in run.iterdir() if path.suffix in (".pth", ".safetensors")}
    assert "checkpoint.pth" in kept and len(kept) >= 2

    calls = {"training": 0}
    real_forward = Cov3dLoss.forward

    def nan_on_epoch_two_batch_two(self, *args):
        loss = real_forward(self, *args)
        if torch.is_grad_enabled():
            calls["training"] += 1
            if calls["training"] == 2:  # the resumed run starts at epoch 2 (index 1): its batch 2
                return loss * float("nan")
        return loss

    monkeypatch.setattr(Cov3dLoss, "forward", nan_on_epoch_two_batch_two)
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 3
    (run / "config.json").write_text(json.dumps(config))
    from cov3d.training.train import resume_training

    with pytest.raises(NonFiniteTraining) as caught:
        resume_training(run, cache_dir=module_dir / "cache", device="cpu", precision="fp32", workers=1)
    error = caught.value
    assert (error.epoch, error.epochs, error.batch, error.what) == (2, 3, 2, "training loss")
    message = str(error)
    assert "\n" not in message
    for words in ("epoch 2 of 3", "batch 2 of 2", "--learning-rate", f"--resume {run}"):
        assert words in message
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.name in kept} == kept

    monkeypatch.setattr(Cov3dLoss, "forward", real_forward)
    result = resume_training(run, cache_dir=module_dir / "cache", device="cpu", precision="fp32", workers=1)
    assert (run / "checkpoint.pth").read_bytes() != kept["checkpoint.pth"]
    assert result.best_scores


@pytest.mark.slow
def test_non_finite_gradient_stops_the_first_epoch_with_nothing_to_resume(module_dir, guard_dataset, monkeypatch):
    """An infinite gradient in the first step: stopped before the optimiser applies it, no checkpoint."""
    import cov3d.training.train as train_module

    def model_with_infinite_grad(**kwargs):
        model = build_model(**kwargs)
        model.fc[0].weight.register_hook(lambda grad: grad * float("inf"))
        return model

    monkeypatch.setattr(train_module, "build_model", model_with_infinite_grad)
    run = module_dir / "inf-run"
    with pytest.raises(NonFiniteTraining) as caught:
        train(guard_dataset, run, tiny_settings(epochs=1), cache_dir=module_dir / "cache", pretrained=False,
              device="cpu", precision="fp32", workers=1)
    assert (caught.value.epoch, caught.value.batch, caught.value.resumable_epoch) == (1, 1, None)
    assert caught.value.what == "gradient of fc.0.weight"
    assert "start the run again" in str(caught.value)
    assert not (run / "checkpoint.pth").exists()


@pytest.mark.slow
def test_cli_turns_a_non_finite_loss_into_one_line_and_exit_1(module_dir, guard_dataset, monkeypatch):
    from typer.testing import CliRunner

    from cov3d.cli import app

    monkeypatch.setattr(Cov3dLoss, "forward", lambda self, *args: torch.tensor(float("nan"), requires_grad=True))
    result = CliRunner().invoke(app, [
        "train", "-d", str(guard_dataset), "-o", str(module_dir / "cli-run"), "--cache-dir", str(module_dir / "cache"),
        "--depth", "8", "--width", "32", "--epochs", "1", "--batch-size", "3", "--penultimate", "8",
        "--no-pretrained", "--device", "cpu", "--precision", "fp32", "--workers", "1",
    ])
    assert result.exit_code == 1, result.output
    assert result.output.count("Error:") == 1
    error_line = result.output.rstrip("\n").splitlines()[-1]  # after fastai's unfinished progress bar
    assert "Error: Training stopped at epoch 1 of 1, batch 1 of 2: the training loss is not finite" in error_line
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_cpu_bf16_training_checks_every_convolution_once(module_dir, guard_dataset, monkeypatch):
    """`cov3d train --precision bf16` on a CPU: 16-slice volumes (layer4 two slices deep) train finite,
    every convolution geometry is probed once, and the model's convolutions are given back unchanged."""
    import cov3d.training.train as train_module

    verdicts, models = {}, []
    monkeypatch.setattr(bf16_convs, "_verdicts", verdicts)
    monkeypatch.setattr(train_module, "build_model", lambda **kwargs: models.append(build_model(**kwargs)) or models[-1])
    settings = TrainSettings(shape=VolumeShape(16, BF16_SLICE, BF16_SLICE), batch_size=3, penultimate=8, epochs=1)
    train(guard_dataset, module_dir / "bf16-run", settings,
          cache_dir=module_dir / "cache16", pretrained=False, device="cpu", precision="bf16", workers=1)
    assert any(geometry[0][2] == 2 for geometry in verdicts)  # layer4's depth
    assert len(verdicts) >= 11  # stem, layer1..4 convolutions and downsamples, for each batch shape
    assert not any("forward" in vars(module) for module in models[0].modules())
    config = json.loads((module_dir / "bf16-run" / "config.json").read_text())
    assert (config["precision"], config["precision_reason"]) == ("bf16", "asked for")


def test_config_records_the_precision_and_why(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["precision"] == "fp32"
    assert config["precision_reason"] == "asked for"


CPUINFO = "processor : 0\nflags : fpu sse2 avx2 avx512f {extra}\n"


@pytest.mark.parametrize("extra, expected, reason", [
    ("amx_bf16 amx_tile avx512_bf16", torch.bfloat16, "AMX-BF16 tiles and AVX-512 BF16 instructions"),
    ("avx512_bf16", torch.bfloat16, "AVX-512 BF16 instructions"),
    ("avx512_vnni", None, "no native bf16"),
    ("", None, "no native bf16"),
])
def test_auto_precision_on_cpus(tmp_path, monkeypatch, extra, expected, reason):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=extra))
    import cov3d.runtime as runtime

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(runtime, "Path", lambda _: cpuinfo)
    choice = choose_precision("auto", torch.device("cpu"))
    assert choice.dtype == expected
    assert reason in choice.reason


@pytest.mark.parametrize("cap, expected", [
    ("AVX2", None), ("avx512_core", None), ("AVX512_CORE_BF16", torch.bfloat16), ("AVX512_CORE_AMX", torch.bfloat16),
    ("ALL", torch.bfloat16), ("not-an-isa", torch.bfloat16),
])
def test_a_capped_onednn_isa_is_a_cpu_without_native_bf16(tmp_path, monkeypatch, cap, expected):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 keeps oneDNN off the CPU's bf16 instructions (as on an
    AVX2-only CPU), so auto picks fp32 and says why; a value oneDNN ignores changes nothing."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra="avx512_bf16"))
    import cov3d.runtime as runtime

    monkeypatch.setattr(runtime, "Path", lambda _: cpuinfo)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    choice = choose_precision("auto", torch.device("cpu"))
    assert choice.dtype == expected
    if expected is None:
        assert f"ONEDNN_MAX_CPU_ISA={cap}" in choice.reason


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
])
def test_auto_precision_on_gpus_asks_the_given_device(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "GPU")
    device = torch.device("cuda:1")
    choice = choose_precision("auto", device)
    assert choice.dtype == expected
    assert asked == [device]
    assert ("gradient scaler" in choice.reason) == (expected == torch.float16)


def test_demo_refuses_a_model_no_better_than_the_baseline(tmp_path):
    report = DemoReport(run_dir=tmp_path, scores={
        "cov3d validation": {"presence_f1": 0.333, "severity_f1": 0.125},
        "baseline validation": {"presence_f1": 0.603, "severity_f1": 0.153},
    })
    with pytest.raises(Cov3dError, match=r"did not beat the mean-intensity baseline .*0\.333 vs 0\.603"):
        check_beats_baseline(report)
    report.scores["cov3d validation"]["presence_f1"] = 0.958
    check_beats_baseline(report)


def test_non_finite_message_under_reduced_precision_suggests_fp32():
    error = NonFiniteTraining(what="gradient of layer4.1.conv1.0.weight", epoch=2, epochs=16, batch=29, batches=36,
                              precision="bf16", learning_rate=3e-4, resumable_epoch=1, run_dir="demo-output/run")
    assert str(error) == (
        "Training stopped at epoch 2 of 16, batch 29 of 36: the gradient of layer4.1.conv1.0.weight is not finite, "
        "likely from reduced precision (bf16) overflowing or a kernel computing it wrongly. Try --precision fp32 "
        "or a lower --learning-rate (now 0.0003); the checkpoint and best weights of epoch 1 are intact; "
        "continue with --resume demo-output/run."
    )
