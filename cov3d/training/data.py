"""The COV19-CT-DB layout: labelled scans, severity CSVs, class weights and the fastai DataBlock."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.data.block import DataBlock, TransformBlock
from fastai.torch_core import TensorBase
from fastai.vision.augment import RandTransform
from fasttransform import Transform

from cov3d.dataset.layout import PARTITIONS, PRESENCE_FOLDERS, SEVERITY_CSVS, read_severity_csv
from cov3d.dataset.scans import is_jpeg_scan_dir, scan_number
from cov3d.errors import Cov3dError
from cov3d.preprocessing.cache import values_on
from cov3d.preprocessing.preprocess import VolumeCache

logger = logging.getLogger(__name__)

REFLECTION_PROBABILITY = 0.5  # the paper's augmentation: random sagittal reflection with p = 0.5
DEFAULT_BATCH_SIZE = 2  # paper §3.4: "The batch size was limited to two"


@dataclass(frozen=True)
class TrainingItem:
    """One labelled scan: its folder, partition and target (has_covid, severity 0..4)."""

    path: Path
    partition: str
    has_covid: int
    severity: int

    @property
    def name(self) -> str:
        return self.path.name


def partition_items(data_dir: Path, partition: str, severities: dict[str, int]) -> list[TrainingItem]:
    """The labelled scans of one partition folder, with severities attached to covid scans."""
    items = []
    for folder, has_covid in PRESENCE_FOLDERS.items():
        class_dir = data_dir / partition / folder
        if not class_dir.is_dir():
            raise Cov3dError(f"Missing folder {class_dir}: expected {partition}/covid and {partition}/non-covid.")
        scan_dirs = sorted((p for p in class_dir.iterdir() if is_jpeg_scan_dir(p)), key=lambda p: (scan_number(p.name), p.name))
        items += [
            TrainingItem(path, partition, has_covid, severities.get(path.name, 0) if has_covid else 0) for path in scan_dirs
        ]
    covid_names = {item.name for item in items if item.has_covid}
    unknown = sorted(set(severities) - covid_names)
    if unknown:
        logger.warning(
            "%d names in the %s severity CSV have no folder in %s/covid (e.g. %s); they are ignored.",
            len(unknown), partition, partition, unknown[0],
        )
    return items


def collect_items(data_dir: Path, *, with_severity: bool = True) -> list[TrainingItem]:
    """All labelled scans of `data_dir` (train and validation), in a stable order.

    With `with_severity`, the two severity CSVs must be present in `data_dir`.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise Cov3dError(f"Data folder not found: {data_dir}. Give the folder that holds train/ and validation/.")
    items = []
    for partition in PARTITIONS:
        severities = read_severity_csv(data_dir / SEVERITY_CSVS[partition]) if with_severity else {}
        items += partition_items(data_dir, partition, severities)
    for partition in PARTITIONS:
        if not any(item.partition == partition for item in items):
            raise Cov3dError(f"No scans found in {data_dir / partition}: each scan is a folder of <number>.jpg slices.")
    return items


def severity_group_counts(items: Sequence[TrainingItem]) -> list[int]:
    """Counts of the six loss groups (negative, positive-unannotated, mild, moderate, severe, critical)."""
    counts = [0] * 6
    for item in items:
        group = 0 if not item.has_covid else (1 if item.severity == 0 else item.severity + 1)
        counts[group] += 1
    return counts


def presence_counts(items: Sequence[TrainingItem]) -> list[int]:
    """Counts of (negative, positive) scans."""
    positives = sum(item.has_covid for item in items)
    return [len(items) - positives, positives]


class TensorCT(TensorBase):
    """A CT volume (1, D, H, W) or batch (B, 1, D, H, W); the type lets transforms skip the targets."""


class SagittalReflection(RandTransform):
    """Flip the left-right (W) axis with probability p, in training only (split_idx 0)."""

    split_idx = 0

    def __init__(self, p: float = REFLECTION_PROBABILITY):
        super().__init__(p=p)

    def encodes(self, volume: TensorCT) -> TensorCT:
        return volume.flip(-1)


class EverySplitReflection(SagittalReflection):
    """``SagittalReflection`` in validation too (the original code reflected validation scans at random)."""

    split_idx = None


class VolumeLoader(Transform):
    """Picklable getter: TrainingItem -> cached uint8 levels (1, D, H, W) as a TensorCT.

    Items stay uint8 (a quarter of float32's bytes) through the loader processes, pinned
    memory and the copy to the device; ``LevelsToValues`` turns batches into values there.
    A Transform subclass rather than a plain callable object: fasttransform wraps such objects
    in a local function, which cannot be pickled to loader workers started by a fork server.
    """

    def __init__(self, cache: VolumeCache):
        super().__init__()
        self.cache = cache

    def encodes(self, item):  # untyped: every item is a TrainingItem; no return annotation (fastcore would cast)
        return TensorCT(self.cache.checked_levels(item.path))


class LevelsToValues(Transform):
    """Batch transform: uint8 levels (B, 1, D, H, W) -> float32 values level / 255 in [0, 1],
    the same values as ``VolumeCache.get``; runs after the batch reaches its device."""

    order = -90  # after AsyncToDevice (-100), before anything that expects values

    def encodes(self, levels: TensorCT):  # no return annotation: fastcore would cast the result to it
        return TensorCT(values_on(levels.as_subclass(torch.Tensor), levels.device))


def scan_target(item: TrainingItem) -> torch.Tensor:
    """The target tensor [has_covid, severity] (long, shape (2,))."""
    return torch.tensor([item.has_covid, item.severity], dtype=torch.long)


def split_by_partition(items: Sequence[TrainingItem]) -> tuple[list[int], list[int]]:
    """Indices of the training and the validation items."""
    return (
        [i for i, item in enumerate(items) if item.partition == "train"],
        [i for i, item in enumerate(items) if item.partition == "validation"],
    )


def build_datablock(cache: VolumeCache, *, reflect: bool = True, validation_reflection: bool = False) -> DataBlock:
    """A DataBlock over TrainingItems: x = cached volume (1, D, H, W), y = tensor([has_covid, severity]).

    Items hold uint8 levels; batches hold float32 values in [0, 1] (``LevelsToValues``). With
    ``reflect``, training items are reflected at random; with ``validation_reflection`` as well,
    validation items too.
    """
    reflection = EverySplitReflection() if validation_reflection else SagittalReflection()
    return DataBlock(
        blocks=(TransformBlock(), TransformBlock()),
        get_x=VolumeLoader(cache),
        get_y=scan_target,
        splitter=split_by_partition,
        item_tfms=[reflection] if reflect else [],
        batch_tfms=[LevelsToValues()],
    )
