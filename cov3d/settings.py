"""Settings shared by the stages: one value for a volume's shape, and the defaults of training, the
demo and inference, declared once.

``VolumeShape`` is the size a scan is preprocessed to (depth D, height H, width W) together with
the decode mode (``fast_decode``): the presets, the cache's folders, the models' config.json and
inference all use it. Shapes given by numbers follow the paper's rule (section 3.1): H = W and
D = W / 2 unless given.

The settings dataclasses (``TrainSettings``, ``DemoSettings``) and the inference defaults live here,
without torch, so that the command line derives its defaults from them and starts fast. The allowed
range of each number is declared with it (``cov3d.limits``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cov3d.errors import Cov3dError
from cov3d.limits import (
    DEMO_SCANS,
    DEPTH_SCALE,
    DROPOUT,
    FRACTION,
    LEARNING_RATE,
    LIMIT_KEY,
    OPTIONAL_SIZE,
    SEED,
    SIZE,
    SLICE_SIZE,
    SMOOTHING,
    WEIGHT_DECAY,
    check_fields,
    limited,
)

SHAPE_FOLDER = re.compile(r"(\d+)x(\d+)x(\d+)(-fast)?")
"""``VolumeShape.folder_name``: ``DxHxW``, with ``-fast`` for fast-decoded volumes."""


@dataclass(frozen=True)
class VolumeShape:
    """A preprocessed volume's size (1, ``depth``, ``height``, ``width``) and whether its JPEG
    slices were decoded at reduced scale (``fast_decode``, see ``cov3d.preprocessing.preprocess``).

    Hashable: inference keys the volumes of an ensemble's different inputs by it.
    """

    depth: int = field(metadata={LIMIT_KEY: SIZE})
    height: int = field(metadata={LIMIT_KEY: SIZE})
    width: int = field(metadata={LIMIT_KEY: SIZE})
    fast_decode: bool = False

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def dims(self) -> tuple[int, int, int]:
        """(D, H, W), e.g. for ``torch.Size`` or ``F.interpolate``."""
        return self.depth, self.height, self.width

    @property
    def folder_name(self) -> str:
        """``DxHxW``, plus ``-fast`` with ``fast_decode``: the cache's folder of this shape."""
        return f"{self.depth}x{self.height}x{self.width}" + ("-fast" if self.fast_decode else "")

    def __str__(self) -> str:
        return self.folder_name

    @property
    def cache_params(self) -> dict[str, int]:
        """The preprocessing parameters that key a cache entry (``fast_decode`` as 0/1)."""
        return {"depth": self.depth, "height": self.height, "width": self.width, "fast_decode": int(self.fast_decode)}

    @classmethod
    def from_size(cls, name: str, *, fast_decode: bool = False) -> VolumeShape:
        """The preset ``name`` (``small``, ``medium`` or ``large``)."""
        if name not in PRESETS:
            raise Cov3dError(f"Unknown size '{name}': choose {PRESET_NAMES}.")
        return cls(*PRESETS[name].dims, fast_decode=fast_decode)

    @classmethod
    def from_width(cls, width: int, depth: int | None = None, height: int | None = None, *,
                   fast_decode: bool = False) -> VolumeShape:
        """``width`` with ``height`` (default: the width) and ``depth`` (default: width / 2, paper §3.1)."""
        height = width if height is None else height
        depth = max(1, width // 2) if depth is None else depth
        return cls(depth, height, width, fast_decode)

    @classmethod
    def from_options(cls, size: str | None = None, depth: int | None = None, height: int | None = None,
                     width: int | None = None, *, fast_decode: bool = False,
                     default: VolumeShape | None = None) -> VolumeShape:
        """The shape of a command's options: the preset ``size``, or the numbers given (width
        default: small's, then ``from_width``), or ``default`` (small) when none is given."""
        for name, value in (("depth", depth), ("height", height), ("width", width)):
            OPTIONAL_SIZE.check(name, value)
        numbers = (depth, height, width) != (None, None, None)
        if size is not None:
            if numbers:
                raise Cov3dError("Give either `size` or `depth`/`height`/`width`, not both.")
            return cls.from_size(size, fast_decode=fast_decode)
        if not numbers:
            return cls(*(default or SMALL).dims, fast_decode=fast_decode)
        return cls.from_width(SMALL.width if width is None else width, depth, height, fast_decode=fast_decode)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VolumeShape:
        """The shape recorded in a run's config.json (keys depth, height, width, fast_decode;
        runs written before fast decoding existed lack the last)."""
        return cls(config["depth"], config["height"], config["width"], bool(config.get("fast_decode", False)))


PRESETS = {
    "small": VolumeShape(64, 128, 128),
    "medium": VolumeShape(128, 256, 256),
    "large": VolumeShape(160, 320, 320),
}
"""The paper's volume sizes (section 3.1), each with D = W / 2."""
SMALL = PRESETS["small"]
_NAMED = [f"{name} ({shape})" for name, shape in PRESETS.items()]
PRESET_NAMES = f"{', '.join(_NAMED[:-1])} or {_NAMED[-1]}"
"""'small (64x128x128), medium (128x256x256) or large (160x320x320)'."""

POOLS = ("avg", "max")
"""Global pooling before the model's head."""


@dataclass
class TrainSettings:
    """Everything that defines a run; saved as config.json. Defaults follow the paper (§3.4, §3.5).

    The volume shape is kept as the fields depth, height, width and fast_decode (config.json's
    keys); ``shape`` gives them as one value.
    """

    depth: int = limited(SMALL.depth, SIZE)
    height: int = limited(SMALL.height, SIZE)
    width: int = limited(SMALL.width, SIZE)
    epochs: int = limited(40, SIZE)
    batch_size: int = limited(2, SIZE)
    learning_rate: float = limited(1e-4, LEARNING_RATE)
    weight_decay: float = limited(1e-5, WEIGHT_DECAY)
    severity_factor: float = limited(0.5, FRACTION)
    presence_smoothing: float = limited(0.1, SMOOTHING)
    severity_smoothing: float = limited(0.1, SMOOTHING)
    penultimate: int = limited(512, SIZE)
    dropout: float = limited(0.5, DROPOUT)
    pool: str = "avg"
    reflect: bool = True
    fast_decode: bool = False
    seed: int = limited(0, SEED)

    def __post_init__(self) -> None:
        """Reject settings out of range (``cov3d.limits``) or that the model cannot be built with,
        before any data is read."""
        check_fields(self)
        if self.pool not in POOLS:
            raise Cov3dError(f"`pool` must be one of {', '.join(POOLS)}, got '{self.pool}'.")

    @property
    def shape(self) -> VolumeShape:
        return VolumeShape(self.depth, self.height, self.width, self.fast_decode)

    @property
    def outputs(self) -> int:
        """Logits of the model (``cov3d.model.loss.model_outputs``)."""
        from cov3d.model.loss import model_outputs

        return model_outputs(self.severity_factor)


DEMO_SHAPE = VolumeShape(16, 64, 64)
"""The demo's volumes: much smaller than the presets, so that it trains in minutes on a CPU."""


@dataclass
class DemoSettings:
    """The demo's dataset and training sizes (chosen to finish in minutes on 2 CPU cores).

    ``height`` ``None``: the width.
    """

    scans: int = limited(240, DEMO_SCANS)
    seed: int = limited(0, SEED)
    slice_size: int = limited(128, SLICE_SIZE)
    depth_scale: float = limited(0.1, DEPTH_SCALE)
    annotated_fraction: float = limited(0.75, FRACTION)
    depth: int = limited(DEMO_SHAPE.depth, SIZE)
    width: int = limited(DEMO_SHAPE.width, SIZE)
    height: int | None = limited(None, OPTIONAL_SIZE)
    fast_decode: bool = False
    epochs: int = limited(16, SIZE)
    batch_size: int = limited(4, SIZE)
    learning_rate: float = limited(3e-4, LEARNING_RATE)
    severity_factor: float = limited(0.5, FRACTION)
    penultimate: int = limited(128, SIZE)
    dropout: float = limited(0.2, DROPOUT)

    def __post_init__(self) -> None:
        """Reject out-of-range settings (``cov3d.limits``) before anything is generated."""
        check_fields(self)

    @property
    def shape(self) -> VolumeShape:
        return VolumeShape(self.depth, self.width if self.height is None else self.height, self.width, self.fast_decode)

    def train_settings(self) -> TrainSettings:
        shape = self.shape
        return TrainSettings(
            depth=shape.depth, height=shape.height, width=shape.width, fast_decode=shape.fast_decode,
            epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
            severity_factor=self.severity_factor, penultimate=self.penultimate, dropout=self.dropout,
            seed=self.seed,
        )


INFER_BATCH_SIZE = 2
"""Scans per forward pass of inference."""
INFER_SEED = 0
"""Seed of the Monte-Carlo dropout samples."""
