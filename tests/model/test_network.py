"""The r3d_18 adaptation: shapes, RGB-summed stem, weight loading, dropout placement, pooling."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.video import r3d_18

from cov3d.errors import Cov3dError
from cov3d.model.network import (
    PretrainedWeightsMissing,
    build_model,
    kinetics_weights_path,
    load_kinetics_state_dict,
    sum_rgb_stem,
)

KINETICS_FILE = "r3d_18-b3b3357e.pth"  # basename of torchvision's R3D_18_Weights.KINETICS400_V1 URL
KINETICS_URL = "https://download.pytorch.org/models/r3d_18-b3b3357e.pth"
TINY = (2, 1, 8, 32, 32)


@pytest.fixture(scope="module")
def rgb_state_dict() -> dict[str, torch.Tensor]:
    """A random 3-channel, 400-way r3d_18 state dict standing in for the Kinetics weights."""
    torch.manual_seed(0)
    net = r3d_18(weights=None)
    with torch.no_grad():  # give BatchNorm non-default statistics so that loading them is visible
        for module in net.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return net.state_dict()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(TINY)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """Point the torch hub cache at an empty temporary folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub"


def test_output_shapes(tiny_input):
    assert build_model().eval()(tiny_input).shape == (2, 6)
    assert build_model(outputs=1, penultimate=16).eval()(tiny_input).shape == (2, 1)


def test_stem_takes_one_channel():
    conv = build_model().stem[0]
    assert conv.in_channels == 1 and conv.out_channels == 64
    assert conv.kernel_size == (3, 7, 7) and conv.stride == (1, 2, 2) and conv.padding == (1, 3, 3)
    assert conv.bias is None


def test_stem_is_channel_sum_of_given_weights(rgb_state_dict):
    model = build_model(pretrained_weights=rgb_state_dict)
    rgb = rgb_state_dict["stem.0.weight"]
    assert rgb.shape == (64, 3, 3, 7, 7)  # the caller's dict is left untouched
    expected = rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3]
    torch.testing.assert_close(model.stem[0].weight.detach(), expected)


def test_other_layers_equal_given_weights(rgb_state_dict):
    loaded = build_model(pretrained_weights=rgb_state_dict).state_dict()
    backbone = [k for k in rgb_state_dict if k != "stem.0.weight" and not k.startswith("fc.")]
    assert len(backbone) > 100
    for key in backbone:
        torch.testing.assert_close(loaded[key], rgb_state_dict[key], rtol=0, atol=0, msg=key)
    assert loaded["fc.3.weight"].shape == (6, 512)  # new head, not the 400-way classifier


def test_random_init_differs_from_given_weights(rgb_state_dict):
    model = build_model()
    assert not torch.equal(model.layer1[0].conv1[0].weight, rgb_state_dict["layer1.0.conv1.0.weight"])


def test_sum_rgb_stem_returns_copy(rgb_state_dict):
    summed = sum_rgb_stem(rgb_state_dict)
    assert summed["stem.0.weight"].shape == (64, 1, 3, 7, 7)
    assert rgb_state_dict["stem.0.weight"].shape == (64, 3, 3, 7, 7)
    assert summed["layer2.0.conv1.0.weight"] is rgb_state_dict["layer2.0.conv1.0.weight"]
    w = rgb_state_dict["stem.0.weight"]
    assert summed["stem.0.weight"][5, 0, 1, 2, 3].item() == pytest.approx(
        w[5, 0, 1, 2, 3].item() + w[5, 1, 1, 2, 3].item() + w[5, 2, 1, 2, 3].item(), rel=1e-6
    )
    with pytest.raises(Cov3dError):
        sum_rgb_stem({"fc.weight": torch.zeros(1)})


def test_grey_input_response_is_preserved(rgb_state_dict):
    # Summing over RGB makes the 1-channel stem on x equal the RGB stem on x repeated 3 times.
    model = build_model(pretrained_weights=rgb_state_dict).eval()
    rgb = r3d_18(weights=None)
    rgb.load_state_dict(rgb_state_dict)
    rgb.eval()
    x = torch.rand(1, 1, 4, 16, 16)
    torch.testing.assert_close(model.stem(x), rgb.stem(x.repeat(1, 3, 1, 1, 1)), rtol=1e-4, atol=1e-5)


def test_dropout_positions():
    model = build_model(dropout=0.3)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name)
        assert isinstance(layer[-1], nn.Dropout) and layer[-1].p == 0.3
        assert sum(isinstance(m, nn.Dropout) for m in layer.modules()) == 1
    assert [type(m) for m in model.fc] == [nn.Linear, nn.Dropout, nn.ReLU, nn.Linear]
    assert model.fc[0].in_features == 512 and model.fc[1].p == 0.3
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 5


def test_dropouts_run_in_order(tiny_input):
    model = build_model(penultimate=8)
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    called: list[str] = []
    for module in names:
        module.register_forward_hook(lambda m, i, o: called.append(names[m]))
    model(tiny_input)
    assert called == ["layer1.2", "layer2.2", "layer3.2", "layer4.2", "fc.1"]


def test_dropout_active_only_in_training(tiny_input):
    torch.manual_seed(2)
    model = build_model(dropout=0.5)
    model.eval()
    torch.testing.assert_close(model(tiny_input), model(tiny_input))
    model.train()
    assert not torch.equal(model(tiny_input), model(tiny_input))


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_global_pooling(pool, tiny_input):
    model = build_model(pool=pool).eval()
    expected_type = nn.AdaptiveMaxPool3d if pool == "max" else nn.AdaptiveAvgPool3d
    assert isinstance(model.avgpool, expected_type)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(features=o))
    model.fc.register_forward_hook(lambda m, i, o: seen.update(pooled=i[0]))
    assert model(tiny_input).shape == (2, 6)
    features = seen["features"].flatten(2)
    reference = features.amax(dim=2) if pool == "max" else features.mean(dim=2)
    torch.testing.assert_close(seen["pooled"], reference)


def test_defaults_are_the_original_codes_max_pool_and_no_final_bias():
    model = build_model()
    assert isinstance(model.avgpool, nn.AdaptiveMaxPool3d)
    assert model.fc[3].bias is None and "fc.3.bias" not in model.state_dict()
    assert model.fc[0].bias is not None  # the penultimate layer keeps its bias
    assert model.layer1[-1].p == 0.5 and model.fc[1].p == 0.5  # the original's dropout


def test_final_bias_option(tiny_input):
    model = build_model(final_bias=True).eval()
    assert model.fc[3].bias is not None and "fc.3.bias" in model.state_dict()
    with torch.no_grad():
        without = model(tiny_input) - model.fc[3].bias
        model.fc[3].bias.zero_()
        torch.testing.assert_close(model(tiny_input), without)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        build_model(pool="median")
    with pytest.raises(ValueError):
        build_model(dropout=1.0)
    with pytest.raises(ValueError):
        build_model(outputs=0)


def test_kinetics_weights_path(hub_dir):
    assert kinetics_weights_path() == hub_dir / "checkpoints" / KINETICS_FILE


def test_missing_weights_message(hub_dir):
    with pytest.raises(PretrainedWeightsMissing) as info:
        load_kinetics_state_dict()
    message = str(info.value)
    assert isinstance(info.value, Cov3dError)
    assert str(hub_dir / "checkpoints" / KINETICS_FILE) in message
    assert KINETICS_URL in message
    assert "--no-pretrained" in message and "--pretrained-weights" in message
    assert "\n" not in message


def test_missing_given_file_names_it(tmp_path, hub_dir):
    absent = tmp_path / "nowhere.pth"
    with pytest.raises(PretrainedWeightsMissing, match="nowhere.pth"):
        build_model(pretrained_weights=absent)


def test_load_from_hub_cache(rgb_state_dict, hub_dir):
    cached = hub_dir / "checkpoints" / KINETICS_FILE
    cached.parent.mkdir(parents=True)
    torch.save(rgb_state_dict, cached)
    loaded = load_kinetics_state_dict()
    assert loaded.keys() == rgb_state_dict.keys()
    torch.testing.assert_close(loaded["layer3.1.conv2.0.weight"], rgb_state_dict["layer3.1.conv2.0.weight"])


@pytest.mark.parametrize("as_str", [False, True])
def test_load_from_file(rgb_state_dict, tmp_path, as_str):
    path = tmp_path / "kinetics.pth"
    torch.save(rgb_state_dict, path)
    model = build_model(pretrained_weights=str(path) if as_str else path)
    rgb = rgb_state_dict["stem.0.weight"]
    torch.testing.assert_close(model.stem[0].weight.detach(), rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3])
    torch.testing.assert_close(model.layer4[1].conv2[1].running_var, rgb_state_dict["layer4.1.conv2.1.running_var"])


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(Cov3dError, match="broken.pth"):
        build_model(pretrained_weights=path)


def test_state_dict_that_does_not_fit(rgb_state_dict):
    incomplete = {k: v for k, v in rgb_state_dict.items() if k != "layer1.0.conv1.0.weight"}
    with pytest.raises(Cov3dError, match="layer1.0.conv1.0.weight"):
        build_model(pretrained_weights=incomplete)
    wrong_shape = dict(rgb_state_dict, **{"layer2.0.conv1.0.weight": torch.zeros(1)})
    with pytest.raises(Cov3dError):
        build_model(pretrained_weights=wrong_shape)
    extra = dict(rgb_state_dict, **{"layer5.weight": torch.zeros(1)})
    with pytest.raises(Cov3dError, match="layer5.weight"):
        build_model(pretrained_weights=extra)


def test_batchnorm_counters_optional(rgb_state_dict):
    without = {k: v for k, v in rgb_state_dict.items() if not k.endswith("num_batches_tracked")}
    model = build_model(pretrained_weights=without)
    torch.testing.assert_close(model.stem[1].running_mean, rgb_state_dict["stem.1.running_mean"])


def test_channels_last_and_bf16_autocast(tiny_input):
    model = build_model().eval()
    with torch.no_grad():
        reference = model(tiny_input)
        model = model.to(memory_format=torch.channels_last_3d)
        channels_last = model(tiny_input.to(memory_format=torch.channels_last_3d))
        torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tiny_input.to(memory_format=torch.channels_last_3d))
    assert low.shape == (2, 6) and low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, rtol=0.1, atol=0.1)


def test_backward_reaches_stem(tiny_input):
    model = build_model(penultimate=8)
    model(tiny_input).sum().backward()
    grad = model.stem[0].weight.grad
    assert grad is not None and grad.shape == (64, 1, 3, 7, 7) and grad.abs().sum() > 0
