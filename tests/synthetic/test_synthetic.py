"""Tests for the synthetic COV19-CT-DB generator and the chest phantoms (tiny sizes, CPU)."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cov3d.dataset.dicom_nifti import hu_to_uint8
from cov3d.dataset.intensity import band_distance, band_fractions, middle_half
from cov3d.dataset.layout import SEVERITY_LABELS
from cov3d.errors import Cov3dError
from cov3d.synthetic.generator import MASKS_FOLDER, generate_dataset, mask_path, read_masks, render_scan, sample_depths
from cov3d.synthetic.phantom import HU_GGO, SEVERITY_BANDS, render_phantom
from cov3d.window import DEFAULT_WINDOW

TINY = dict(scans=12, slice_size=32, depth_scale=0.05)
NAME = re.compile(r"^ct_scan_?(\d+)$")


@pytest.fixture(scope="module")
def tiny(module_dir):
    """A 12-scan dataset and its summary."""
    out = module_dir
    return out, generate_dataset(out, seed=3, **TINY)


def scan_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    return rows[0], rows[1:]


def test_severity_names():
    assert SEVERITY_LABELS == ("mild", "moderate", "severe", "critical")


def test_layout_and_summary(tiny):
    out, summary = tiny
    expected = {"train", "validation", "test", "train_partition_covid_categories.csv",
                "val_partition_covid_categories.csv", "test_labels.csv", "cov3d-synthetic.json"}
    assert {p.name for p in out.iterdir()} == expected
    for partition in ("train", "validation"):
        assert {p.name for p in (out / partition).iterdir()} == {"covid", "non-covid"}
        for label in ("covid", "non-covid"):
            assert len(scan_dirs(out / partition / label)) == summary.counts[partition][label] >= 1
    assert all(p.is_dir() for p in (out / "test").iterdir())  # flat: scan folders only, no labels
    counts = {part: sum(by.values()) for part, by in summary.counts.items()}
    assert counts == {"train": 8, "validation": 2, "test": 2}  # 12 scans: round(2.4) = 2 each for val/test
    assert summary.total_scans == 12
    names = [d.name for d in out.glob("*/*/ct_scan*")] + [d.name for d in (out / "test").iterdir()]
    assert all(NAME.match(n) for n in names)
    assert any(n.startswith("ct_scan") and not n.startswith("ct_scan_") for n in names)


def test_slices_numbered_and_valid_greyscale_jpeg(tiny):
    out, summary = tiny
    folders = list(out.glob("*/*/ct_scan*")) + scan_dirs(out / "test")
    depths = []
    for folder in folders:
        files = list(folder.iterdir())
        assert sorted(int(f.stem) for f in files) == list(range(len(files)))
        assert all(f.suffix == ".jpg" for f in files)
        sizes = set()
        for f in files:
            with Image.open(f) as image:
                assert image.format == "JPEG" and image.mode == "L"
                sizes.add(image.size)
                image.load()
        mixed = str(folder.relative_to(out)) in summary.mixed_size_scans
        assert (len(sizes) == 2) == mixed
        assert (32, 32) in sizes
        depths.append(len(files))
    assert sorted(depths) == sorted(summary.depths)
    assert min(depths) == 1 and len(summary.mixed_size_scans) == 1  # ceil(0.03 * 12)


def test_category_csvs(tiny):
    out, summary = tiny
    for partition, name in (("train", "train_partition_covid_categories.csv"),
                            ("validation", "val_partition_covid_categories.csv")):
        text = (out / name).read_text()
        assert text.splitlines()[0] == "Name;Category"
        header, rows = read_rows(out / name)
        covid = {d.name for d in scan_dirs(out / partition / "covid")}
        assert all(len(row) == 2 and row[0] in covid and row[1] in {"1", "2", "3", "4"} for row in rows)
        # annotated_fraction 0.5, rounded half up, of the covid scans
        assert len(rows) == int(len(covid) * 0.5 + 0.5)
        by_name = {n: sum(int(r[1]) == i for r in rows) for i, n in enumerate(SEVERITY_LABELS, 1)}
        assert by_name == summary.annotated[partition]


def test_answer_key_matches_test_folders(tiny):
    out, summary = tiny
    header, rows = read_rows(out / "test_labels.csv")
    assert header == ["Name", "Covid", "Category"]
    assert sorted(r[0] for r in rows) == sorted(d.name for d in scan_dirs(out / "test"))
    for _, covid, category in rows:
        assert covid in {"0", "1"}
        assert (category == "0") if covid == "0" else category in {"1", "2", "3", "4"}
    assert sum(r[1] == "1" for r in rows) == summary.counts["test"]["covid"]


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
    options = dict(scans=8, slice_size=24, depth_scale=0.03)
    generate_dataset(tmp_path / "a", seed=5, **options)
    generate_dataset(tmp_path / "b", seed=5, **options)
    generate_dataset(tmp_path / "c", seed=6, **options)
    a, b, c = (_all_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c


def test_two_workers_write_the_same_bytes_and_progress_as_one(tmp_path):
    """Each scan has its own seed: rendering in 2 processes gives the serial dataset byte for byte
    (masks and CSVs included), and progress still counts every scan in order."""
    options = dict(scans=8, slice_size=24, depth_scale=0.03, seed=3, masks=True)
    seen = []
    generate_dataset(tmp_path / "serial", **options)
    generate_dataset(tmp_path / "parallel", workers=2, progress=lambda done, total: seen.append((done, total)), **options)
    assert _all_bytes(tmp_path / "serial") == _all_bytes(tmp_path / "parallel")
    assert seen == [(done, 8) for done in range(1, 9)]


def test_existing_output_needs_overwrite(tmp_path):
    options = dict(scans=10, slice_size=16, depth_scale=0.02, test_scans=0)
    generate_dataset(tmp_path, **options)
    with pytest.raises(Cov3dError, match="already exists"):
        generate_dataset(tmp_path, **options)
    (tmp_path / "notes.txt").write_text("kept")
    summary = generate_dataset(tmp_path, seed=1, overwrite=True, **options)
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert summary.counts["test"] == {"covid": 0, "non-covid": 0}
    with pytest.raises(Cov3dError):
        generate_dataset(tmp_path / "small", scans=3)


def test_depth_distribution_is_bimodal_like_the_paper():
    depths = sample_depths(np.random.default_rng(0), 20000)
    assert depths.min() >= 1 and depths.max() <= 1201
    assert 0.58 < np.mean(depths < 160) < 0.7  # paper: more than 58 % under 160 slices
    assert 0.97 < np.mean(depths < 500) < 1.0  # paper: almost 99 % under 500
    counts, _ = np.histogram(depths, bins=[30, 100, 130, 200, 250, 450])
    low_mode, valley, high_mode = counts[0], counts[2], counts[4]
    assert low_mode > 10 * valley and high_mode > 10 * valley
    assert np.mean(depths <= 10) > 0.005  # a tail of very short scans


def test_depth_scale_rescales_the_same_draws():
    full = sample_depths(np.random.default_rng(7), 500)
    scaled = sample_depths(np.random.default_rng(7), 500, depth_scale=0.1)
    np.testing.assert_array_equal(scaled, np.maximum(np.rint(full * 0.1), 1))


@pytest.mark.parametrize("severity", [1, 2, 3, 4])
def test_involved_fraction_inside_the_severity_band(severity):
    low, high = SEVERITY_BANDS[severity]
    for seed in range(4):
        phantom = render_phantom(np.random.default_rng(seed), depth=6, slice_size=32, has_covid=True, severity=severity)
        assert low < phantom.fraction < high
        # independent route: lung voxels denser than -650 HU (lesions; vessels add a little)
        dense = np.mean(phantom.hu[phantom.lung] > -650.0)
        assert abs(dense - phantom.fraction) < 0.1
        # each lung is involved (bilateral disease)
        half = phantom.lesion.shape[2] // 2
        assert phantom.lesion[:, :, :half].any() and phantom.lesion[:, :, half:].any()


def test_render_scan_outputs():
    volume, fraction = render_scan(np.random.default_rng(0), depth=3, slice_size=20, has_covid=False, severity=0)
    assert volume.shape == (3, 20, 20) and volume.dtype == np.uint8 and fraction == 0.0
    volume, fraction = render_scan(np.random.default_rng(0), depth=1, slice_size=20, has_covid=True, severity=0)
    assert volume.shape == (1, 20, 20) and 0.0 < fraction < 1.0
    with pytest.raises(ValueError):
        render_scan(np.random.default_rng(0), depth=3, slice_size=20, has_covid=False, severity=2)


def test_phantoms_go_through_the_calibrated_window():
    # level -470, width 1410: -1175 HU -> 0, 235 HU -> 255, -470 -> 127.5 rounds to 128
    np.testing.assert_array_equal(hu_to_uint8(np.array([-2000.0, -1175.0, -470.0, 235.0, 700.0])), [0, 0, 128, 255, 255])
    phantom = render_phantom(np.random.default_rng(0), depth=2, slice_size=16, has_covid=False, severity=0)
    volume, _ = render_scan(np.random.default_rng(0), depth=2, slice_size=16, has_covid=False, severity=0)
    np.testing.assert_array_equal(volume, DEFAULT_WINDOW.to_uint8(phantom.hu))


def test_phantoms_look_like_cov19_ct_db():
    """Issue 13: mid-slice band fractions within L1 0.15 of COV19-CT-DB's; air and soft tissue at its grey levels;
    a body that fills most of the width; a field-of-view disc in some scans only."""
    fractions, body_widths, discs = [], [], []
    for seed in range(12):
        phantom = render_phantom(np.random.default_rng(seed), depth=12, slice_size=96, has_covid=seed % 2 == 1, severity=0)
        grey = DEFAULT_WINDOW.to_uint8(phantom.hu)
        fractions.append(band_fractions(grey[list(middle_half(12))]))
        middle = phantom.hu[6]
        body_widths.append(np.mean((middle > -500).any(axis=0)))
        discs.append(bool(middle[0, 0] < -1500))
    assert band_distance(np.mean(fractions, axis=0)) < 0.15
    assert 0.8 < np.mean(body_widths) < 1.0
    assert 0 < sum(discs) < len(discs)


def test_masks_are_written_beside_the_data(tmp_path):
    out = tmp_path / "data"
    generate_dataset(out, seed=1, masks=True, **TINY)
    scans = sorted(p for p in out.rglob("ct_scan*") if p.is_dir())
    masks = sorted((out / MASKS_FOLDER).rglob("*.npz"))
    assert len(masks) == len(scans) == TINY["scans"]
    assert not any(path.suffix == ".jpg" for path in (out / MASKS_FOLDER).rglob("*"))
    key = {row[0]: row for row in read_rows(out / "test_labels.csv")[1]}
    for scan in scans:
        lesion, lung = read_masks(mask_path(out, scan))
        slices = len(list(scan.glob("*.jpg")))
        assert lesion.shape == lung.shape == (slices, 32, 32) and lesion.dtype == bool
        assert not (lesion & ~lung).any()
        has_covid = scan.parent.name == "covid" or (scan.parent.name == "test" and key[scan.name][1] == "1")
        assert lesion.any() == has_covid or slices <= 2
    assert generate_dataset(tmp_path / "plain", seed=1, **TINY) and not (tmp_path / "plain" / MASKS_FOLDER).exists()


def test_covid_has_more_ggo_range_lung_voxels_than_negatives():
    low, high = hu_to_uint8(np.array([HU_GGO[0] - 100.0, HU_GGO[1] + 50.0]))

    def ggo_share(has_covid: bool, severity: int, seed: int) -> float:
        phantom = render_phantom(np.random.default_rng(seed), depth=6, slice_size=32, has_covid=has_covid, severity=severity)
        grey = hu_to_uint8(phantom.hu)[phantom.lung]
        return float(np.mean((grey >= low) & (grey <= high)))

    negatives = [ggo_share(False, 0, seed) for seed in range(8)]
    positives = [ggo_share(True, 1 + seed % 4, seed) for seed in range(8)]
    assert min(positives) > max(negatives)
    assert max(negatives) < 0.06


def test_the_dataset_says_it_is_synthetic_and_training_records_it(tiny, tmp_path):
    from cov3d.training.provenance import training_data

    out, _ = tiny
    recorded = training_data(out)
    assert recorded["synthetic"] is True and recorded["generator"] == "cov3d synthetic"
    assert training_data(tmp_path) == {"synthetic": False}  # a dataset of the user's: no marker
