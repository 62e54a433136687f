"""The Cov3d network: torchvision's r3d_18 adapted to single-channel CT volumes (paper sec. 3.2).

Changes to ``torchvision.models.video.r3d_18``:
- the stem's first convolution takes 1 input channel; pretrained (Kinetics-400) weights for it are
  summed over the RGB axis;
- ``nn.Dropout`` is appended to each of ``layer1``..``layer4`` (appended inside the existing
  ``nn.Sequential``, so the parameter names stay torchvision's);
- ``fc`` becomes Linear(512 -> penultimate) -> Dropout -> ReLU -> Linear(penultimate -> outputs), the
  last without a bias unless ``final_bias``;
- ``avgpool`` is replaced by global max pooling unless ``pool="avg"`` (the attribute name is kept);
- each convolution runs as a matrix product where its output has a few voxels, in fp32 on a CPU
  (``cov3d.model.gemm_convs``: the same function up to fp32 rounding, faster; parameters and their
  names unchanged).

The paper does not say which global pooling or whether the last layer has a bias; the defaults
(max pooling, no bias) are those of the original code at the paper's time (rbturnbull/cov3d at
c562971: ``max_pool=True``, ``final_bias=False``); see docs/faithfulness.md.

Input (B, 1, D, H, W) -> output (B, outputs).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models.video import R3D_18_Weights, r3d_18

from cov3d.errors import Cov3dError
from cov3d.limits import DROPOUT
from cov3d.logits import OUTPUTS
from cov3d.model.gemm_convs import route_small_convs
from cov3d.settings import POOLS, TRAIN_DEFAULTS

KINETICS_WEIGHTS = R3D_18_Weights.KINETICS400_V1
"""torchvision's Kinetics-400 weights for r3d_18 (paper sec. 3.2)."""
STEM_CONV_KEY = "stem.0.weight"
"""State-dict key of the first convolution, shape (64, 3, 3, 7, 7) for RGB video."""
RGB_AXIS = 1
"""Input-channel axis of a Conv3d weight (out, in, kT, kH, kW)."""
INPUT_CHANNELS = 1
"""CT volumes have a single channel: grey levels, (1, D, H, W) per scan."""
CLASSIFIER_PREFIX = "fc."
"""Keys of the 400-way Kinetics classifier, replaced by the Cov3d head."""
RESIDUAL_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class PretrainedWeightsMissing(Cov3dError):
    """The Kinetics-400 weights for r3d_18 are not available locally."""

    def __init__(self, looked_at: Path | None = None) -> None:
        cache = kinetics_weights_path()
        where = f"{looked_at} does not exist" if looked_at is not None else f"not found at {cache}"
        super().__init__(
            f"Kinetics-400 weights for r3d_18: {where}. Download {KINETICS_WEIGHTS.url} "
            f"and save it as {cache}, or pass --pretrained-weights FILE, "
            "or train from scratch with --no-pretrained."
        )


def kinetics_weights_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches the r3d_18 Kinetics-400 weights."""
    filename = Path(urlparse(KINETICS_WEIGHTS.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_kinetics_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Load r3d_18 weights from ``path``, else from the torch hub cache; never downloads.

    Raises PretrainedWeightsMissing if the file is absent, Cov3dError if it cannot be read as a
    state dict.
    """
    source = Path(path) if path is not None else kinetics_weights_path()
    if not source.is_file():
        raise PretrainedWeightsMissing(source if path is not None else None)
    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for corrupt or foreign files, with advice that does not apply here
        raise Cov3dError(
            f"Cannot read pretrained weights {source}: it is not a PyTorch state-dict file of tensors only "
            f"(damaged, or another format). Give torchvision's r3d_18 Kinetics-400 file ({Path(urlparse(KINETICS_WEIGHTS.url).path).name})."
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise Cov3dError(f"Pretrained weights {source} are not a state dict (a mapping of names to tensors).")
    return state_dict


def sum_rgb_stem(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy of ``state_dict`` with the first-conv weight summed over RGB: (64, 3, 3, 7, 7) -> (64, 1, 3, 7, 7).

    Summing keeps the response to a grey input (equal RGB channels) unchanged. The input is not modified.
    """
    if STEM_CONV_KEY not in state_dict:
        raise Cov3dError(f"Pretrained weights lack '{STEM_CONV_KEY}': they are not r3d_18 weights.")
    summed = OrderedDict(state_dict)
    summed[STEM_CONV_KEY] = state_dict[STEM_CONV_KEY].sum(dim=RGB_AXIS, keepdim=True)
    return summed


def _single_channel_conv(conv: nn.Conv3d) -> nn.Conv3d:
    """A Conv3d with the geometry of ``conv`` but one input channel."""
    return nn.Conv3d(
        INPUT_CHANNELS,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def _load_backbone(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load every backbone tensor of ``state_dict`` into ``net`` (classifier keys dropped)."""
    backbone = OrderedDict((k, v) for k, v in sum_rgb_stem(state_dict).items() if not k.startswith(CLASSIFIER_PREFIX))
    try:
        result = net.load_state_dict(backbone, strict=False)
    except RuntimeError as error:
        raise Cov3dError(f"Pretrained weights do not fit r3d_18: {error}".replace("\n", " ")) from error
    # BatchNorm counters are optional in older checkpoints; every other backbone tensor is required.
    missing = [
        k for k in result.missing_keys if not k.startswith(CLASSIFIER_PREFIX) and not k.endswith("num_batches_tracked")
    ]
    if missing or result.unexpected_keys:
        raise Cov3dError(
            f"Pretrained weights do not fit r3d_18: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
        )


def build_model(
    *,
    outputs: int = OUTPUTS,
    penultimate: int = TRAIN_DEFAULTS.penultimate,
    dropout: float = TRAIN_DEFAULTS.dropout,
    pool: str = TRAIN_DEFAULTS.pool,
    final_bias: bool = TRAIN_DEFAULTS.final_bias,
    pretrained_weights: Path | str | dict | None = None,
) -> nn.Module:
    """The Cov3d r3d_18: input (B, 1, D, H, W) -> logits (B, outputs).

    ``pretrained_weights``: a state dict, or a file holding one (loaded with ``weights_only=True``);
    None means random initialisation. The 400-way Kinetics ``fc`` is never loaded.
    ``pool``: global pooling before the head, "max" (default) or "avg" (torchvision's).
    ``final_bias``: whether the last linear layer has a bias (default: no).
    """
    if outputs < 1 or penultimate < 1:
        raise ValueError(f"outputs and penultimate must be positive, got {outputs} and {penultimate}")
    if DROPOUT.problem(dropout):
        raise ValueError(f"dropout must be {DROPOUT.describe()}, got {dropout}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")

    net = r3d_18(weights=None)
    net.stem[0] = _single_channel_conv(net.stem[0])
    if pretrained_weights is not None:
        if isinstance(pretrained_weights, dict):
            state_dict = pretrained_weights
        else:
            state_dict = load_kinetics_state_dict(Path(pretrained_weights))
        _load_backbone(net, state_dict)

    for name in RESIDUAL_LAYERS:
        getattr(net, name).append(nn.Dropout(dropout))
    if pool == "max":
        net.avgpool = nn.AdaptiveMaxPool3d(1)
    features = net.fc.in_features
    net.fc = nn.Sequential(
        nn.Linear(features, penultimate),
        nn.Dropout(dropout),
        nn.ReLU(),
        nn.Linear(penultimate, outputs, bias=final_bias),
    )
    return route_small_convs(net)
