"""The HU window: how DICOM and NIfTI scans (and the synthetic phantoms), which hold Hounsfield
units, are mapped to the 8-bit grey levels of COV19-CT-DB's JPEG slices.

``DEFAULT_WINDOW`` is the mapping calibrated to COV19-CT-DB (``cov3d.dataset.intensity``,
docs/intensities.md); a model records the window it was trained with. A ``--window`` is parsed into
a ``Window`` once, where the command line or a config file is read; below that, functions take a
``Window``, or ``MODEL_WINDOW`` where a model's recorded window applies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from cov3d.errors import Cov3dError

MAX_GREY = 255


@dataclass(frozen=True)
class Window:
    """A linear HU window: ``level - width / 2`` HU -> grey 0, ``level + width / 2`` HU -> 255.

    ``str(window)`` is its ``LEVEL,WIDTH`` spelling (``--window``, config files), which
    ``Window.parse`` reads back."""

    level: float
    width: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.level) and np.isfinite(self.width)) or self.width <= 0:
            raise Cov3dError(f"An intensity window needs a finite level and a positive width, got {self.level}, {self.width}.")

    def __str__(self) -> str:
        return f"{self.level:g},{self.width:g}"

    @classmethod
    def parse(cls, text: str) -> Window:
        """``"LEVEL,WIDTH"`` (HU) -> Window; ``Cov3dError`` for anything else."""
        try:
            level, width = (float(part) for part in str(text).split(","))
        except ValueError:
            raise Cov3dError(f"A window is LEVEL,WIDTH in HU (e.g. {DEFAULT_WINDOW}), got '{text}'.") from None
        return cls(level, width)

    def grey(self, hu: float) -> float:
        """The (unrounded, unclipped) grey level of ``hu``."""
        return (hu - (self.level - self.width / 2)) * (MAX_GREY / self.width)

    def to_uint8(self, hu: np.ndarray) -> np.ndarray:
        """Map HU to 8-bit grey levels, rounded (half to even, in float64) and clipped; any shape in,
        same shape uint8 out."""
        low = self.level - self.width / 2
        grey = (np.asarray(hu, dtype=np.float64) - low) * (MAX_GREY / self.width)
        return np.clip(np.rint(grey), 0, MAX_GREY).astype(np.uint8)


# The calibration (cov3d.dataset.intensity, docs/intensities.md); change it only with a new measurement.
COV19_CT_DB_WINDOW = Window(level=-470.0, width=1410.0)
DEFAULT_WINDOW = COV19_CT_DB_WINDOW
"""The mapping for DICOM, NIfTI and the phantoms unless ``--window`` or a model says otherwise."""


class ModelWindow(enum.Enum):
    """The window a model recorded in its config.json (``DEFAULT_WINDOW`` for models made before
    windows were recorded): what inference uses unless ``--window`` is given."""

    OWN = "the model's own window"


MODEL_WINDOW = ModelWindow.OWN
