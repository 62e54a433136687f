"""Dataset layout, severity CSVs, class counts and the DataBlock."""

import random

import pytest
import torch

from cov3d.dataset.layout import read_severity_csv
from cov3d.errors import Cov3dError
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.settings import VolumeShape
from cov3d.training.data import (
    DEFAULT_BATCH_SIZE,
    EverySplitReflection,
    LevelsToValues,
    SagittalReflection,
    TensorCT,
    TrainingItem,
    build_datablock,
    collect_items,
    presence_counts,
    severity_group_counts,
)
from cov3d.training.distributed import Distributed
from cov3d.training.loaders import AsyncToDevice, training_loaders


def build_dataloaders(items, cache, *, batch_size=DEFAULT_BATCH_SIZE, reflect=True, num_workers=0, device=None):
    """fastai DataLoaders: training batches shuffled (and reflected), validation in order."""
    return build_datablock(cache, reflect=reflect).dataloaders(
        list(items), bs=batch_size, num_workers=num_workers, device=device
    )


def count_folders(path):
    return sum(1 for p in path.iterdir() if p.is_dir())


def test_collect_items_matches_the_folders_and_csvs(tiny_dataset):
    items = collect_items(tiny_dataset)
    for partition in ("train", "validation"):
        for folder, has_covid in (("covid", 1), ("non-covid", 0)):
            expected = count_folders(tiny_dataset / partition / folder)
            found = [i for i in items if i.partition == partition and i.has_covid == has_covid]
            assert len(found) == expected
    train_csv = read_severity_csv(tiny_dataset / "train_partition_covid_categories.csv")
    for item in items:
        if item.partition == "train" and item.has_covid:
            assert item.severity == train_csv.get(item.name, 0)
        if not item.has_covid:
            assert item.severity == 0


def test_counts_by_hand(tmp_path):
    items = [TrainingItem(tmp_path, "train", c, s) for c, s in [(0, 0), (0, 0), (1, 0), (1, 1), (1, 3), (1, 3), (1, 4)]]
    assert presence_counts(items) == [2, 5]
    # negative, positive-unannotated, mild, moderate, severe, critical
    assert severity_group_counts(items) == [2, 1, 1, 0, 2, 1]


def write_csv(path, text):
    path.write_text(text)
    return path


def test_severity_csv_is_parsed(tmp_path):
    path = write_csv(tmp_path / "s.csv", "Name;Category\nct_scan_1;1\nct_scan7;4\n\n")
    assert read_severity_csv(path) == {"ct_scan_1": 1, "ct_scan7": 4}


@pytest.mark.parametrize("text, message", [
    ("Name,Category\nct_scan_1,1\n", "header"),
    ("Name;Category\nct_scan_1;5\n", "line 2"),
    ("Name;Category\nct_scan_1\n", "line 2"),
    ("", "header"),
])
def test_malformed_severity_csv_names_file_and_line(tmp_path, text, message):
    path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(Cov3dError, match=message) as error:
        read_severity_csv(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_pieces_are_clear_errors(tmp_path, tiny_dataset):
    with pytest.raises(Cov3dError, match="Data folder not found"):
        collect_items(tmp_path / "nowhere")
    (tmp_path / "train" / "covid").mkdir(parents=True)
    with pytest.raises(Cov3dError, match="Severity CSV not found"):
        collect_items(tmp_path)
    with pytest.raises(Cov3dError, match="non-covid"):
        collect_items(tmp_path, with_severity=False)


def test_reflection_flips_width_of_volumes_only_in_training():
    volume = TensorCT(torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4))
    target = torch.tensor([1, 3])
    reflect = SagittalReflection(p=1.0)
    flipped, same_target = reflect((volume, target), split_idx=0)
    assert torch.equal(flipped, volume.flip(-1)) and torch.equal(same_target, target)
    assert flipped[0, 0, 0, 0] == volume[0, 0, 0, 3]
    unchanged, _ = reflect((volume, target), split_idx=1)
    assert torch.equal(unchanged, volume)


def test_validation_reflection_flips_validation_scans_at_random_too():
    """The original code's reflection was a plain transform: validation scans were flipped at random too."""
    volume = TensorCT(torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4))
    always = EverySplitReflection(p=1.0)
    for split in (0, 1):
        flipped, _ = always((volume, torch.tensor([0, 0])), split_idx=split)
        assert torch.equal(flipped, volume.flip(-1))
    random.seed(0)  # fastai's RandTransform draws with Python's random
    halves = EverySplitReflection()
    flips = [bool(torch.equal(halves((volume, torch.tensor([0, 0])), split_idx=1)[0], volume.flip(-1))) for _ in range(400)]
    assert 160 < sum(flips) < 240  # p = 0.5: 200 expected, sd 10
    assert [type(tfm) for tfm in build_datablock(None, validation_reflection=True).item_tfms
            if isinstance(tfm, SagittalReflection)] == [EverySplitReflection]
    assert not any(isinstance(tfm, SagittalReflection)
                   for tfm in build_datablock(None, reflect=False, validation_reflection=True).item_tfms)


def test_dataloaders_give_batches_of_two_volumes_and_targets(tmp_path, tiny_dataset):
    items = collect_items(tiny_dataset)
    cache = VolumeCache(tmp_path / "cache", VolumeShape(8, 32, 32))
    dls = build_dataloaders(items, cache)
    assert len(dls.train_ds) == sum(i.partition == "train" for i in items)
    assert len(dls.valid_ds) == sum(i.partition == "validation" for i in items)
    volumes, targets = dls.valid.one_batch()
    assert volumes.shape == (2, 1, 8, 32, 32) and targets.shape == (2, 2)
    assert 0.0 <= float(volumes.min()) and float(volumes.max()) <= 1.0
    first = items[[i.partition for i in items].index("validation")]
    assert targets[0].tolist() == [first.has_covid, first.severity]


def test_items_stay_uint8_and_batches_hold_the_cached_values(tmp_path, tiny_dataset):
    """Items carry a quarter of the bytes; the batch equals VolumeCache.get, value for value."""
    items = collect_items(tiny_dataset)
    cache = VolumeCache(tmp_path / "cache", VolumeShape(8, 32, 32))
    dls = build_dataloaders(items, cache, reflect=False)
    volume, _ = dls.valid_ds[0]
    assert isinstance(volume, TensorCT) and volume.dtype == torch.uint8 and volume.shape == (1, 8, 32, 32)
    volumes, _ = dls.valid.one_batch()
    validation = [item for item in items if item.partition == "validation"][:2]
    expected = torch.stack([cache.get(item.path) for item in validation])
    assert volumes.dtype == torch.float32
    assert torch.equal(volumes.as_subclass(torch.Tensor), expected)


def test_training_batches_convert_levels_after_the_device_copy(tmp_path, tiny_dataset):
    items = collect_items(tiny_dataset)
    cache = VolumeCache(tmp_path / "cache", VolumeShape(8, 32, 32))
    dls = training_loaders(items, cache, batch_size=2, reflect=True, device=torch.device("cpu"), workers=0,
                           dist=Distributed())
    for loader in dls.loaders:
        kinds = [type(tfm) for tfm in loader.after_batch.fs]
        assert kinds.index(AsyncToDevice) < kinds.index(LevelsToValues)
    volumes, targets = dls.train.one_batch()
    assert volumes.dtype == torch.float32 and 0.0 <= float(volumes.min()) and float(volumes.max()) <= 1.0
    assert targets.dtype == torch.long
