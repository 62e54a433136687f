"""The demo's settings: its dataset, its workload (scans, volume size and epochs) by the precision in use, and
its training hyperparameters, chosen so that ``cov3d demo`` finishes in minutes on 2 CPU cores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cov3d.errors import Cov3dError
from cov3d.limits import (
    DEMO_SCANS,
    DEPTH_SCALE,
    DROPOUT,
    FRACTION,
    LEARNING_RATE,
    OPTIONAL_SIZE,
    SEED,
    SIZE,
    SLICE_SIZE,
    WARP,
    check_fields,
    limited,
)
from cov3d.settings import TrainSettings, VolumeShape


@dataclass(frozen=True)
class DemoWorkload:
    """How much the demo trains: the scans it generates, the size of its volumes and its epochs."""

    scans: int
    shape: VolumeShape
    epochs: int

    def __str__(self) -> str:
        return f"{self.scans} scans, {self.epochs} epochs of {self.shape}"


DEMO_WORKLOADS = {
    "bf16 or fp16 (a CPU with native bf16, a GPU)": DemoWorkload(320, VolumeShape(16, 48, 48), 11),
    "fp32 (a CPU without native bf16)": DemoWorkload(480, VolumeShape(16, 32, 32), 5),
}
"""The demo's workload by the precision a run uses, so that it takes under 10 minutes on 2 cores of
every CPU kind measured (docs/demo.md). A training step in fp32 does the work of a bf16 step at about
70 % of the speed on the same CPU, and an AVX2-only CPU has no native bf16 at all: fp32 trains smaller
volumes (a step at 16x32x32 does 44 % of the convolution FLOPs of one at 16x48x48) on more scans for
fewer epochs (288 training scans for 5 epochs: 360 steps against 11 x 48 = 528), 30 % of the bf16
workload's FLOPs in all; the more scans, the less a model this small overfits them, and the finer the
validation score. Native bf16 on a CPU and any GPU (bf16 or fp16) train the full workload."""


def demo_workload(precision: str) -> DemoWorkload:
    """The demo's workload for a resolved precision name (fp32, bf16 or fp16)."""
    reduced, fp32 = DEMO_WORKLOADS.values()
    return fp32 if precision == "fp32" else reduced


DEMO_WORKLOADS_HELP = " or ".join(f"{workload} in {name}" for name, workload in DEMO_WORKLOADS.items())
"""'320 scans, 11 epochs of 16x48x48 in bf16 or fp16 (...) or ...': the help of the demo's workload."""


@dataclass
class DemoSettings:
    """The demo's dataset and training sizes (chosen to finish in minutes on 2 CPU cores).

    ``scans``, ``depth``, ``width`` and ``epochs`` ``None``: the workload of the precision in use
    (``with_workload``); ``height`` ``None``: the width.
    """

    scans: int | None = limited(None, DEMO_SCANS)
    seed: int = limited(0, SEED)
    slice_size: int = limited(128, SLICE_SIZE)
    depth_scale: float = limited(0.1, DEPTH_SCALE)
    annotated_fraction: float = limited(0.75, FRACTION)
    depth: int | None = limited(None, OPTIONAL_SIZE)
    width: int | None = limited(None, OPTIONAL_SIZE)
    height: int | None = limited(None, OPTIONAL_SIZE)
    fast_decode: bool = False
    warp: float = limited(0.0, WARP)
    epochs: int | None = limited(None, OPTIONAL_SIZE)
    batch_size: int = limited(4, SIZE)
    learning_rate: float = limited(3e-4, LEARNING_RATE)
    severity_factor: float = limited(0.5, FRACTION)
    penultimate: int = limited(128, SIZE)
    dropout: float = limited(0.0, DROPOUT)
    """No dropout: the paper's dropout after each residual layer feeds the next layer's batch norm
    activations whose variance it raised, so the running statistics no longer fit the model in
    evaluation (no dropout there). Trained from scratch for 12 epochs, the demo's model then predicted
    one class on validation (docs/demo.md); with dropout 0 the two modes agree."""

    def __post_init__(self) -> None:
        """Reject out-of-range settings (``cov3d.limits``) before anything is generated."""
        check_fields(self)

    def with_workload(self, precision: str) -> DemoSettings:
        """These settings with the scans, volume size and epochs of ``demo_workload(precision)`` where unset."""
        workload = demo_workload(precision)
        return dataclasses.replace(
            self,
            scans=workload.scans if self.scans is None else self.scans,
            depth=workload.shape.depth if self.depth is None else self.depth,
            width=workload.shape.width if self.width is None else self.width,
            epochs=workload.epochs if self.epochs is None else self.epochs,
        )

    @property
    def shape(self) -> VolumeShape:
        """The volumes' shape; needs ``depth`` and ``width`` (``with_workload`` fills them)."""
        if self.depth is None or self.width is None:
            raise Cov3dError("The demo's volume size depends on the precision: call `with_workload` first.")
        height = self.width if self.height is None else self.height
        return VolumeShape(self.depth, height, self.width, self.fast_decode, self.warp)

    def train_settings(self) -> TrainSettings:
        shape = self.shape
        if self.epochs is None:
            raise Cov3dError("The demo's epochs depend on the precision: call `with_workload` first.")
        return TrainSettings(
            shape=shape, epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
            severity_factor=self.severity_factor, penultimate=self.penultimate, dropout=self.dropout,
            seed=self.seed,
        )
