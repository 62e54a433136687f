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

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from cov3d import recipes
from cov3d.errors import Cov3dError
from cov3d.limits import (
    DIV_FACTOR,
    DROPOUT,
    FRACTION,
    LEARNING_RATE,
    LIMIT_KEY,
    MOMENTUM,
    OPTIONAL_SIZE,
    SEED,
    SIZE,
    SMOOTHING,
    WARP,
    WEIGHT_DECAY,
    check_fields,
    limited,
)
from cov3d.logits import model_outputs
from cov3d.window import DEFAULT_WINDOW, MODEL_WINDOW, ModelWindow, Window

SHAPE_FOLDER = re.compile(r"(\d+)x(\d+)x(\d+)(-fast)?(?:-warp([0-9.e-]+))?")
"""``VolumeShape.folder_name``: ``DxHxW``, with ``-fast`` for fast-decoded volumes and ``-warp<f>``
for warped ones."""


@dataclass(frozen=True)
class VolumeShape:
    """A preprocessed volume's size (1, ``depth``, ``height``, ``width``) and how it is made: whether
    JPEG slices are decoded at reduced scale (``fast_decode``), the factor of the original code's cubic
    coordinate warp (``warp``, 0: off; see ``cov3d.preprocessing.preprocess``) and the HU -> grey
    mapping of DICOM and NIfTI scans (``window``, ``cov3d.window``).

    Hashable: inference keys the volumes of an ensemble's different inputs by it.
    """

    depth: int = field(metadata={LIMIT_KEY: SIZE})
    height: int = field(metadata={LIMIT_KEY: SIZE})
    width: int = field(metadata={LIMIT_KEY: SIZE})
    fast_decode: bool = False
    warp: float = field(default=0.0, metadata={LIMIT_KEY: WARP})
    window: Window = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "warp", float(self.warp))
        if not isinstance(self.window, Window):
            raise TypeError(f"window must be a Window (parse `LEVEL,WIDTH` with Window.parse), got {self.window!r}")

    @property
    def dims(self) -> tuple[int, int, int]:
        """(D, H, W), e.g. for ``torch.Size`` or ``F.interpolate``."""
        return self.depth, self.height, self.width

    @property
    def folder_name(self) -> str:
        """``DxHxW``, plus ``-fast`` with ``fast_decode`` and ``-warp<f>`` with a warp: the cache's
        folder of this shape."""
        fast = "-fast" if self.fast_decode else ""
        warp = f"-warp{self.warp:g}" if self.warp else ""
        return f"{self.depth}x{self.height}x{self.width}{fast}{warp}"

    def __str__(self) -> str:
        return self.folder_name

    def with_window(self, window: Window | ModelWindow) -> VolumeShape:
        """This shape with DICOM/NIfTI HU mapped through ``window`` instead (``MODEL_WINDOW``: unchanged)."""
        return self if window is MODEL_WINDOW else dataclasses.replace(self, window=window)

    def stored_as(self, holds_hu: bool) -> VolumeShape:
        """The shape that keys a scan's cache entry: this one for scans in HU (DICOM, NIfTI), which
        the window maps to grey levels; for JPEG slices, grey levels already that no window changes,
        this one with ``DEFAULT_WINDOW`` (the key of every JPEG entry, also of those made before
        ``--window`` existed), so that another window finds the same entries."""
        return self if holds_hu else dataclasses.replace(self, window=DEFAULT_WINDOW)

    @property
    def config(self) -> dict[str, int | float | bool | str]:
        """The shape as config.json records it (keys depth, height, width, fast_decode, warp, window)."""
        return {"depth": self.depth, "height": self.height, "width": self.width, "fast_decode": self.fast_decode,
                "warp": self.warp, "window": str(self.window)}

    @property
    def cache_params(self) -> dict[str, int | float | str]:
        """The preprocessing parameters that key a cache entry (``fast_decode`` as 0/1, ``window`` as
        ``LEVEL,WIDTH``; ``warp`` only when there is one)."""
        params: dict[str, int | float | str] = {
            "depth": self.depth, "height": self.height, "width": self.width, "fast_decode": int(self.fast_decode),
            "window": str(self.window),
        }
        if self.warp:
            params["warp"] = self.warp
        return params

    @classmethod
    def from_size(cls, name: str, *, fast_decode: bool = False, warp: float = 0.0) -> VolumeShape:
        """The preset ``name`` (``small``, ``medium`` or ``large``)."""
        if name not in PRESETS:
            raise Cov3dError(f"Unknown size '{name}': choose {PRESET_NAMES}.")
        return cls(*PRESETS[name].dims, fast_decode=fast_decode, warp=warp)

    @classmethod
    def parse(cls, text: str) -> VolumeShape:
        """A preset name (``small``) or ``DxHxW`` (``16x64x64``), e.g. a script's ``--size``."""
        if text in PRESETS:
            return PRESETS[text]
        try:
            depth, height, width = (int(number) for number in text.lower().split("x"))
        except ValueError:
            raise Cov3dError(f"A size is {PRESET_NAMES} or DxHxW (e.g. 16x64x64), got '{text}'.") from None
        return cls(depth, height, width)

    @classmethod
    def from_width(cls, width: int, depth: int | None = None, height: int | None = None, *,
                   fast_decode: bool = False, warp: float = 0.0) -> VolumeShape:
        """``width`` with ``height`` (default: the width) and ``depth`` (default: width / 2, paper §3.1)."""
        height = width if height is None else height
        depth = max(1, width // 2) if depth is None else depth
        return cls(depth, height, width, fast_decode, warp)

    @classmethod
    def from_options(cls, size: str | None = None, depth: int | None = None, height: int | None = None,
                     width: int | None = None, *, fast_decode: bool = False, warp: float = 0.0,
                     window: Window = DEFAULT_WINDOW, default: VolumeShape | None = None) -> VolumeShape:
        """The shape of a command's options: the preset ``size``, or the numbers given (width
        default: small's, then ``from_width``), or ``default`` (small) when none is given; made with
        ``fast_decode``, ``warp`` and ``window``."""
        return cls._sized(size, depth, height, width, fast_decode=fast_decode, warp=warp, default=default).with_window(window)

    @classmethod
    def _sized(cls, size: str | None, depth: int | None, height: int | None, width: int | None, *,
               fast_decode: bool, warp: float, default: VolumeShape | None) -> VolumeShape:
        for name, value in (("depth", depth), ("height", height), ("width", width)):
            OPTIONAL_SIZE.check(name, value)
        numbers = (depth, height, width) != (None, None, None)
        if size is not None:
            if numbers:
                raise Cov3dError("Give either `size` or `depth`/`height`/`width`, not both.")
            return cls.from_size(size, fast_decode=fast_decode, warp=warp)
        if not numbers:
            return cls(*(default or SMALL).dims, fast_decode=fast_decode, warp=warp)
        return cls.from_width(SMALL.width if width is None else width, depth, height, fast_decode=fast_decode, warp=warp)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VolumeShape:
        """The shape recorded in a run's config.json (keys depth, height, width, fast_decode, warp,
        window; runs written before fast decoding, the warp or the window existed lack those: off,
        off and ``DEFAULT_WINDOW``)."""
        window = config.get("window")
        return cls(config["depth"], config["height"], config["width"], bool(config.get("fast_decode", False)),
                   float(config.get("warp", 0.0)), DEFAULT_WINDOW if window is None else Window.parse(window))


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

ONE_CYCLE_POINTS = 3
"""The 1cycle momentum schedule runs through three values: start, peak, end."""

POOLS = ("avg", "max")
"""Global pooling before the model's head."""
DEFAULT_POOL = "max"
"""Global max pooling (``AdaptiveMaxPool3d``), as the original code at the paper's time; the paper
does not say. Runs recorded without a pool used torchvision's average pooling."""
DEFAULT_FINAL_BIAS = False
"""The original code's last linear layer had no bias at the paper's time."""
PRESENCE_AVERAGING = ("batch", "weighted")
"""How the weighted presence terms of a batch are averaged: over the batch size, 1/B sum w l (the
original code), or over their weights, sum w l / sum w."""
DEFAULT_PRESENCE_AVERAGING = "batch"
FUSED_ADAMW = "fused-adamw"
FASTAI_ADAM = "fastai-adam"
OPTIMIZERS = (FUSED_ADAMW, FASTAI_ADAM)
"""How Adam is computed (``cov3d.training.optimizer``): torch's fused AdamW kernel, or fastai's Adam (the
original code's implementation of the same arithmetic, about ten operations per parameter per step;
runs recorded without an optimizer used it)."""


@dataclass
class TrainSettings:
    """Everything that defines a run; saved as config.json. Defaults are the paper recipe: the paper
    (§3.4, §3.5) and, where it is silent (pool, final_bias, presence_averaging), the original code at
    the paper's time; ``warp`` (the original's coordinate warp, not in the paper) is off. ``for_recipe``
    gives the original code's defaults instead (``cov3d.recipes``). See docs/faithfulness.md.

    The volume shape is one value, ``shape``; config.json records it flat (``to_config``:
    depth, height, width, fast_decode, warp and window, the keys it has always had).
    """

    shape: VolumeShape = SMALL
    """The volumes (size, decoding, warp) and the window of DICOM/NIfTI HU, which the model expects at inference."""
    epochs: int = limited(40, SIZE)
    batch_size: int = limited(2, SIZE)
    learning_rate: float = limited(1e-4, LEARNING_RATE)
    weight_decay: float = limited(1e-5, WEIGHT_DECAY)
    severity_factor: float = limited(0.5, FRACTION)
    presence_smoothing: float = limited(0.1, SMOOTHING)
    severity_smoothing: float = limited(0.1, SMOOTHING)
    penultimate: int = limited(512, SIZE)
    dropout: float = limited(0.5, DROPOUT)
    pool: str = DEFAULT_POOL
    final_bias: bool = DEFAULT_FINAL_BIAS
    presence_averaging: str = DEFAULT_PRESENCE_AVERAGING
    reflect: bool = True
    seed: int = limited(0, SEED)
    pct_start: float = limited(0.25, FRACTION)
    """Share of the 1cycle schedule spent raising the learning rate (fastai's ``fit_one_cycle``)."""
    div_factor: float = limited(25.0, DIV_FACTOR)
    """The schedule starts at ``learning_rate / div_factor`` (fastai's ``div``)."""
    final_div_factor: float = limited(1e5, DIV_FACTOR)
    """The schedule ends at ``learning_rate / final_div_factor`` (fastai's ``div_final``)."""
    momentums: tuple[float, float, float] = (0.95, 0.85, 0.95)
    """Adam's beta1 at the start, the peak and the end of the schedule (fastai's ``moms``)."""
    optimizer: str = FUSED_ADAMW
    recipe: str = recipes.PAPER
    """Which defaults the run was made with (``cov3d.recipes``); the settings below are its own."""
    severity_loss: str = recipes.EVERY_SCAN
    presence_weighting: str = recipes.ITEM_WEIGHTS
    validation_reflection: bool = False
    """With ``reflect``, reflect validation scans at random too (the original code)."""
    presence_decision: str = recipes.MEAN_PROBABILITY
    kept_weights: str = recipes.PER_TASK

    def __post_init__(self) -> None:
        """Reject settings out of range (``cov3d.limits``) or that the model cannot be built with,
        before any data is read."""
        check_fields(self)
        self.momentums = tuple(self.momentums)
        if len(self.momentums) != ONE_CYCLE_POINTS:
            raise Cov3dError(f"`momentums` are three numbers (start, peak, end), got {list(self.momentums)}.")
        for momentum in self.momentums:
            MOMENTUM.check("momentums", momentum)
        if self.pool not in POOLS:
            raise Cov3dError(f"`pool` must be one of {', '.join(POOLS)}, got '{self.pool}'.")
        if self.optimizer not in OPTIMIZERS:
            raise Cov3dError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'.")
        if self.presence_averaging not in PRESENCE_AVERAGING:
            raise Cov3dError(
                f"`presence_averaging` must be one of {', '.join(PRESENCE_AVERAGING)}, got '{self.presence_averaging}'."
            )
        recipes.check_recipe_settings(self)

    @classmethod
    def for_recipe(cls, recipe: str = recipes.PAPER, **given: Any) -> TrainSettings:
        """The settings of ``recipe`` (``cov3d.recipes.recipe_defaults``; without a ``shape``, small
        volumes with its warp), except those ``given``."""
        given.setdefault("shape", dataclasses.replace(SMALL, warp=recipes.recipe_warp(recipe)))
        return cls(recipe=recipe, **{**recipes.recipe_defaults(recipe), **given})

    @property
    def outputs(self) -> int:
        """Outputs of the model (``cov3d.logits.model_outputs``)."""
        return model_outputs(self.severity_factor, graded_only=self.severity_loss == recipes.GRADED_ONLY)

    def to_config(self) -> dict[str, Any]:
        """These settings as config.json records them: the shape flat (``VolumeShape.config``), the
        momentums as a list."""
        fields = {name: getattr(self, name) for name in self.field_names()}
        return {**self.shape.config, **fields, "momentums": list(self.momentums)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainSettings:
        """The settings ``to_config`` recorded (``KeyError`` for a missing key; checked like new settings)."""
        return cls(shape=VolumeShape.from_config(config), **{name: config[name] for name in cls.field_names()})

    @classmethod
    def field_names(cls) -> list[str]:
        """The fields besides ``shape``, each one key of config.json."""
        return [setting.name for setting in dataclasses.fields(cls) if setting.name != "shape"]

    @classmethod
    def config_keys(cls) -> list[str]:
        """Every key ``to_config`` writes."""
        return [*SMALL.config, *cls.field_names()]


DETERMINISTIC = True
"""Default of ``--deterministic``: the same seed gives the same run (``cov3d.runtime.kernel_choice``; the cost in docs/gpu.md)."""

RESUMABLE = ("data_dir", "cache_dir", "device", "precision", "workers", "loader_workers", "use_wandb", "deterministic")
"""What a resumed run takes from config.json unless it is given again (keyword arguments of
``cov3d.training.train.train``); its other settings cannot change."""

TRAIN_DEFAULTS = TrainSettings()
"""The defaults of a run, for the library's functions and the command line to show and pass on."""


@dataclass(frozen=True)
class SyntheticSettings:
    """Defaults of a synthetic dataset (``cov3d.synthetic.generator.generate_dataset``, ``cov3d synthetic``)."""

    scans: int = 120
    seed: int = 0
    slice_size: int = 128
    depth_scale: float = 0.1
    """Scale of the slice-count distribution (1.0: like COV19-CT-DB)."""
    annotated_fraction: float = 0.5
    mixed_size_fraction: float = 0.03


SYNTHETIC_DEFAULTS = SyntheticSettings()


INFER_BATCH_SIZE = 2
"""Scans per forward pass of inference."""
INFER_SEED = 0
"""Seed of the Monte-Carlo dropout samples."""

EXPLAIN_METHODS = ("gradcam", "occlusion")
"""``cov3d explain``'s attributions (``cov3d.inference.explain``): Grad-CAM of the last residual
block (one forward and backward pass) or occlusion sensitivity (one forward pass per block)."""
DEFAULT_EXPLAIN_METHOD = "gradcam"
"""The cheaper map, and the one at the last residual block that the literature uses."""
OCCLUSION_GRID = (4, 6, 6)
"""Blocks along (D, H, W) that the occlusion map replaces one at a time (blocks of 4 x 8 x 8 voxels
at the demo's 16 x 48 x 48): 145 volumes through the model, the scan and one per block."""
