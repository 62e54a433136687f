"""The scan checks of ``cov3d.dataset.domain`` (``not-ct``, ``no-lungs``): counts by hand on a drawn
slice, thresholds from the HU scale, and volumes made here: phantoms in HU (lungs kept, lungs filled),
an MR-like volume, a DICOM series whose modality is MR, JPEG stacks, and the real chest CT."""

from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cov3d.dataset.domain import (
    FLAG_NO_LUNGS,
    FLAG_NOT_CT,
    GREY_BODY,
    GREY_LUNG_BAND,
    MIN_LUNG_SHARE,
    ScanMeasure,
    flags_cell,
    scan_flags,
)
from cov3d.preprocessing.preprocess import VolumeCache, preprocess_scan
from cov3d.settings import VolumeShape
from cov3d.synthetic.phantom import HU_SOFT_TISSUE, MM_PER_UNIT, Z_EXTENT, render_phantom
from cov3d.window import DEFAULT_WINDOW

SLICES, SIZE = 12, 64
PIXEL_MM, SLICE_MM = 2 * MM_PER_UNIT / SIZE, Z_EXTENT * MM_PER_UNIT / SLICES
"""The phantoms' field of view is 350 mm across and covers 297.5 mm of chest."""
REAL_SERIES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real-ct" / "lung-pet-ct-dx-A0002-thorax-8mm"


def measured(hu_slices, voxel_mm3=None):
    measure = ScanMeasure()
    measure.voxel_mm3 = voxel_mm3
    for hu in hu_slices:
        measure.add_hu(np.asarray(hu, dtype=np.float32))
    return measure.result()


def test_counts_by_hand_on_a_drawn_slice():
    """A 128 x 128 slice (measured at every pixel): air, a 100 x 100 body of soft tissue, a 40 x 40
    lung of -850 HU inside it, and a 10 x 10 pocket of gas whose 44-pixel rim is at -600 HU (a thin
    ring, under 2 % of the body: not lung); 10 slices of 1 mm^3 voxels."""
    hu = np.full((128, 128), -1000.0)
    hu[10:110, 10:110] = 40.0
    hu[40:80, 40:80] = -850.0
    hu[19:31, 19:31] = -600.0
    hu[20:30, 20:30] = -1000.0
    result = measured([hu] * 10, voxel_mm3=1.0)
    assert result["air_share"] == pytest.approx((128 * 128 - 100 * 100 + 100) / (128 * 128))
    assert result["lung_share"] == pytest.approx(1600 / 10000)  # the lung is a hole of the body, filled
    assert result["lung_litres"] == pytest.approx(10 * 1600 / 1e6)
    assert set(scan_flags(result)) == {FLAG_NO_LUNGS}  # 0.016 L < 0.5 L


def test_long_scans_are_measured_every_kth_slice_to_the_same_totals():
    hu = np.full((128, 128), -1000.0)
    hu[10:110, 10:110] = 40.0
    hu[40:80, 40:80] = -850.0
    measure = ScanMeasure()
    measure.voxel_mm3 = 1.0
    measure.expect(300)  # every 2nd slice
    for _ in range(300):
        measure.add_hu(hu)
    assert measure.slice_step == 2 and measure.voxels == 150 * 128 * 128
    assert measure.result()["lung_litres"] == pytest.approx(300 * 1600 / 1e6)


def test_thresholds_follow_the_hu_scale():
    # Through the calibrated window (-1175 HU -> 0, 235 HU -> 255): -500 HU is (675 / 1410) * 255 grey.
    assert GREY_BODY == pytest.approx(675 / 1410 * 255)
    assert GREY_LUNG_BAND == pytest.approx((225 / 1410 * 255, 875 / 1410 * 255))
    assert MIN_LUNG_SHARE == pytest.approx(0.02)
    assert flags_cell(["synthetic-model", "not-ct"]) == "not-ct;synthetic-model" and flags_cell([]) == ""


@pytest.fixture(scope="module")
def phantoms():
    """A negative and a critical COVID-19 phantom (the most lung turned to lesion), in HU."""
    rng = np.random.default_rng(3)
    return [render_phantom(rng, depth=SLICES, slice_size=SIZE, has_covid=covid, severity=4 if covid else 0)
            for covid in (False, True)]


def filled(phantom):
    hu = phantom.hu.copy()
    hu[phantom.lung] = HU_SOFT_TISSUE
    return hu


def test_phantoms_pass_and_lose_their_lungs_when_filled(phantoms):
    for phantom in phantoms:
        kept = measured(phantom.hu, PIXEL_MM**2 * SLICE_MM)
        assert scan_flags(kept) == {} and kept["lung_litres"] > 1.0
        assert set(scan_flags(measured(filled(phantom), PIXEL_MM**2 * SLICE_MM))) == {FLAG_NO_LUNGS}
        cropped = measured(phantom.hu[-1:], PIXEL_MM**2 * SLICE_MM)  # one slice at the base: 25 mm of lung
        assert set(scan_flags(cropped)) == {FLAG_NO_LUNGS}


def write_nifti(path, volume, spacing):
    """A (D, H, W) volume, head first, as RAS voxels (x: columns reversed, y: rows reversed, z: slices reversed)."""
    ras = np.flip(np.asarray(volume).transpose(2, 1, 0), axis=(0, 1, 2))
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(ras).astype(np.int16), np.diag([*spacing, 1.0])), path)
    return path


def nifti_flags(path):
    measure = ScanMeasure()
    preprocess_scan(path, 4, 16, 16, measure=measure)
    return measure.result(), scan_flags(measure.result())


def test_nifti_phantom_ct_mr_and_no_lungs(phantoms, tmp_path):
    spacing = (PIXEL_MM, PIXEL_MM, SLICE_MM)
    result, flags = nifti_flags(write_nifti(tmp_path / "chest.nii.gz", phantoms[1].hu, spacing))
    assert flags == {} and result["values"] == "hu"
    assert set(nifti_flags(write_nifti(tmp_path / "abdomen.nii.gz", filled(phantoms[1]), spacing))[1]) == {FLAG_NO_LUNGS}
    # MR-like: no negative values, background 0, tissue in the hundreds to thousands (arbitrary units).
    mr = np.clip(phantoms[0].hu + 1000.0, 0, None) * 1.8
    result, flags = nifti_flags(write_nifti(tmp_path / "mr.nii.gz", mr, spacing))
    assert set(flags) == {FLAG_NOT_CT} and result["values"] == f"from 0 to {int(mr.max()):g}"  # stored as int16
    # The same scaled to 0..1, as some pipelines store MR: still not HU.
    nibabel.save(nibabel.Nifti1Image(np.asarray(mr / mr.max(), dtype=np.float32), np.eye(4)), tmp_path / "mr01.nii")
    assert set(nifti_flags(tmp_path / "mr01.nii")[1]) == {FLAG_NOT_CT}
    # MR-like values that happen to start below -500 (a signed, shifted image): no air near -1000 HU.
    result, flags = nifti_flags(write_nifti(tmp_path / "shifted-mr.nii.gz", mr - 2000.0, spacing))
    assert set(flags) == {FLAG_NOT_CT} and result["air_share"] < 0.005


def write_series(folder, modality, slices=3):
    folder.mkdir()
    uid = generate_uid()
    for index in range(slices):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.Modality = modality
        dataset.ImagePositionPatient = [0.0, 0.0, 5.0 * index]
        dataset.SeriesInstanceUID, dataset.SOPInstanceUID = uid, generate_uid()
        dataset.save_as(folder / f"{index}.dcm")
    return folder


def test_a_dicom_series_whose_modality_is_mr_is_not_ct(tmp_path):
    cache = VolumeCache(tmp_path / "cache", VolumeShape(4, 16, 16))
    _, domain = cache.levels_and_domain(write_series(tmp_path / "mr", "MR"))
    assert domain["modality"] == "MR" and scan_flags(domain) == {FLAG_NOT_CT: "its DICOM modality is MR, not CT"}
    _, domain = cache.levels_and_domain(write_series(tmp_path / "ct", "CT"))
    assert "modality" not in scan_flags(domain).get(FLAG_NOT_CT, "")  # CT_small is a crop of tissue: no air either
    # The measures are stored with the entry: a second read comes from the cache, with them.
    assert cache.levels_and_domain(tmp_path / "mr")[1]["modality"] == "MR"


def write_jpegs(folder, hu):
    folder.mkdir()
    for index, pixels in enumerate(DEFAULT_WINDOW.to_uint8(hu)):
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=95)
    return folder


def test_jpeg_stacks_get_the_grey_level_version(phantoms, tmp_path):
    cache = VolumeCache(tmp_path / "cache", VolumeShape(4, 16, 16))
    _, chest = cache.levels_and_domain(write_jpegs(tmp_path / "ct_scan_1", phantoms[1].hu))
    assert chest["values"] == "grey" and chest["lung_litres"] is None and scan_flags(chest) == {}
    _, abdomen = cache.levels_and_domain(write_jpegs(tmp_path / "ct_scan_2", filled(phantoms[1])))
    assert set(scan_flags(abdomen)) == {FLAG_NO_LUNGS}


@pytest.mark.skipif(not REAL_SERIES.is_dir(), reason="the shared real CT series is absent")
def test_the_real_chest_ct_is_a_ct_with_lungs(tmp_path):
    _, domain = VolumeCache(tmp_path / "cache", VolumeShape(8, 32, 32)).levels_and_domain(REAL_SERIES)
    assert domain["modality"] == "CT" and scan_flags(domain) == {}
    assert 1.5 < domain["lung_litres"] < 6.0  # 30 slices of 8 mm: the lungs of an adult
