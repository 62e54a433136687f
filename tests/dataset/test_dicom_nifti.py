"""DICOM series and NIfTI volumes: HU through the intensity window, slice order, orientation, the same
predictions as the equivalent JPEG folder, and the edge cases of real archives."""

import csv
import logging
import sys

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cov3d.dataset.dicom_nifti import scan_sources
from cov3d.dataset.scans import find_scans
from cov3d.errors import Cov3dError
from cov3d.inference.infer import infer
from cov3d.preprocessing.cache import entry_path
from cov3d.preprocessing.preprocess import VolumeCache, preprocess_scan
from cov3d.settings import VolumeShape
from cov3d.window import DEFAULT_WINDOW, Window

N_SLICES = 5
SLICE_GAP_MM = 5.0
JPEG_QUALITY = 95


def window_by_hand(hu, level=-470.0, width=1410.0):
    """The calibrated default, level -470 HU, width 1410 HU: -1175 -> 0, 235 -> 255."""
    low = level - width / 2
    return np.clip(np.rint((np.asarray(hu, dtype=np.float64) - low) * (255.0 / width)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def series(module_dir):
    """One CT volume in HU (D, H, W), head first, written as a JPEG folder, a DICOM series built from
    pydicom's CT_small.dcm (shuffled file names, scrambled InstanceNumber, shifted positions, two
    rescale settings) and two NIfTI files (RAS and LPS affines)."""
    root = module_dir
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base_hu = template.pixel_array.astype(np.int32) * int(template.RescaleSlope) + int(template.RescaleIntercept)
    rng = np.random.default_rng(0)
    hu = np.stack([2 * ((np.roll(base_hu, 9 * d, axis=1) - 60 * d) // 2) for d in range(N_SLICES)])  # even HU

    jpeg = root / "ct_scan_1"
    jpeg.mkdir()
    for d, pixels in enumerate(hu):
        Image.fromarray(window_by_hand(pixels)).save(jpeg / f"{d}.jpg", quality=JPEG_QUALITY)

    dicom = root / "ct_scan_2"
    dicom.mkdir()
    uid = generate_uid()
    names = rng.permutation(N_SLICES)
    for d in range(N_SLICES):
        k = N_SLICES - 1 - d  # slice d is the (k+1)-th from the feet: higher z = nearer the head
        slope, intercept = (2, -2048) if d % 2 else (1, -1024)
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.PixelData = ((hu[d] - intercept) // slope).astype(np.int16).tobytes()
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
        dataset.ImagePositionPatient = [-158.1 + 0.7 * k, -179.0 - 0.3 * k, -75.7 + SLICE_GAP_MM * k]
        dataset.InstanceNumber = int(names[d]) + 1  # unrelated to the position
        dataset.SeriesInstanceUID, dataset.SOPInstanceUID = uid, generate_uid()
        dataset.save_as(dicom / f"IM{names[d]:03d}.dcm")

    ras = np.flip(hu.transpose(2, 1, 0), axis=(0, 1, 2)).astype(np.int16)  # ras[I-1-c, J-1-r, K-1-d] = hu[d, r, c]
    nibabel.save(nibabel.Nifti1Image(ras, np.diag([0.66, 0.66, SLICE_GAP_MM, 1.0])), root / "ct_scan_3.nii")
    lps = np.flip(ras, axis=(0, 1)).copy()
    nibabel.save(nibabel.Nifti1Image(lps, np.diag([-0.66, -0.66, SLICE_GAP_MM, 1.0])), root / "ct_scan_4.nii.gz")
    return root, hu


def test_mixed_folder_is_found(series):
    root, _ = series
    scans = find_scans([root])
    assert [scan.name for scan in scans] == ["ct_scan_1", "ct_scan_2", "ct_scan_3.nii", "ct_scan_4.nii.gz"]
    assert [scan_sources(scan).kind for scan in scans] == ["jpeg", "dicom", "nifti", "nifti"]


def test_dicom_order_follows_positions_not_names_or_instance_numbers(series):
    root, _ = series
    files = scan_sources(root / "ct_scan_2").files
    z = [float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]) for path in files]
    assert z == sorted(z, reverse=True)
    assert [path.name for path in files] != sorted(path.name for path in files)


def test_hu_and_window_by_hand(series):
    root, hu = series
    size = hu.shape  # no resizing: the volume is the windowed HU / 255
    for window, by_hand in ((DEFAULT_WINDOW, window_by_hand), (Window(-600, 1500), lambda pixels: window_by_hand(pixels, -600, 1500))):
        expected = np.stack([by_hand(pixels) for pixels in hu]) / 255.0
        for name in ("ct_scan_2", "ct_scan_3.nii", "ct_scan_4.nii.gz"):
            volume = preprocess_scan(root / name, *size, window=window)[0].numpy()
            np.testing.assert_allclose(volume, expected, atol=1e-6, err_msg=f"{name} {window}")
    assert window_by_hand([-1175, -470, 235, 2000]).tolist() == [0, 128, 255, 255]


def test_same_volume_and_prediction_as_the_jpeg_folder(series, tiny_run, tmp_path):
    root, _ = series
    volumes = {name: preprocess_scan(root / name, 8, 32, 32) for name in ("ct_scan_1", "ct_scan_2", "ct_scan_3.nii", "ct_scan_4.nii.gz")}
    jpeg = volumes.pop("ct_scan_1")
    for volume in volumes.values():
        assert float((volume - jpeg).abs().max()) < 0.03  # JPEG compression only
        assert float((volume - jpeg.flip(1)).abs().max()) > 0.2  # the slice order matters
        assert float((volume - volumes["ct_scan_2"]).abs().max()) < 1e-6

    infer(find_scans([root]), tiny_run, tmp_path / "p.csv", cache_dir=tmp_path / "cache", device="cpu", precision="fp32",
          progress=False, workers=0)
    with (tmp_path / "p.csv").open() as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["ct_scan_1", "ct_scan_2", "ct_scan_3", "ct_scan_4"]
    for name in ("ct_scan_2", "ct_scan_3", "ct_scan_4"):
        for column in ("covid_probability", "mild_probability", "critical_probability"):
            assert float(rows[name][column]) == pytest.approx(float(rows["ct_scan_1"][column]), abs=0.01)


@pytest.mark.parametrize(("package", "scan", "extra"), [("pydicom", "ct_scan_2", "dicom"), ("nibabel", "ct_scan_3.nii", "nifti")])
def test_missing_reader_is_a_clear_error(series, monkeypatch, package, scan, extra):
    root, _ = series
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(Cov3dError, match=rf"pip install 'cov3d\[{extra}\]'"):
        preprocess_scan(root / scan, 4, 8, 8)


def test_two_series_in_one_folder_is_refused(series, tmp_path):
    root, _ = series
    folder = tmp_path / "two"
    folder.mkdir()
    for i, path in enumerate(sorted((root / "ct_scan_2").iterdir())[:2]):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = generate_uid()
        dataset.save_as(folder / f"{i}.dcm")
    with pytest.raises(Cov3dError, match="2 DICOM series of equal size") as error:
        scan_sources(folder)
    assert "(1 slices)" in str(error.value) and "\n" not in str(error.value)


def copy_series(source, folder, change=None, keep=None):
    """Copy the DICOM files of ``source`` to ``folder`` (those at sorted indices ``keep``), calling
    ``change(index, dataset)`` on each before saving; returns ``folder``."""
    folder.mkdir()
    paths = scan_sources(source).files  # slice order, head first
    for index, path in enumerate(paths):
        if keep is not None and index not in keep:
            continue
        dataset = pydicom.dcmread(path)
        if change is not None:
            change(index, dataset)
        dataset.save_as(folder / path.name)
    return folder


@pytest.fixture
def logged(caplog, monkeypatch):
    """caplog that also sees the ``cov3d`` logger after the CLI stopped it propagating."""
    monkeypatch.setattr(logging.getLogger("cov3d"), "propagate", True)
    with caplog.at_level("INFO", logger="cov3d"):
        yield caplog


def test_the_largest_of_several_series_is_used(series, tmp_path, logged):
    root, _ = series
    uid = generate_uid()

    def second_series(index, dataset):
        if index >= 3:
            dataset.SeriesInstanceUID, dataset.SeriesDescription = uid, "scout"

    folder = copy_series(root / "ct_scan_2", tmp_path / "mixed", second_series)
    files = scan_sources(folder).files
    assert len(files) == 3 and all(pydicom.dcmread(f).SeriesInstanceUID != uid for f in files)
    assert "2 DICOM series; using the largest" in logged.text and "'scout' (2 slices)" in logged.text


def test_monochrome1_is_read_as_hu(series, tmp_path):
    root, hu = series

    def monochrome1(index, dataset):
        dataset.PhotometricInterpretation = "MONOCHROME1"

    folder = copy_series(root / "ct_scan_2", tmp_path / "mono1", monochrome1)
    expected = preprocess_scan(root / "ct_scan_2", *hu.shape)
    assert torch_equal(preprocess_scan(folder, *hu.shape), expected)


def torch_equal(a, b):
    return bool((a == b).all())


@pytest.mark.parametrize(
    ("change", "keep", "message"),
    [
        (lambda i, d: setattr(d, "NumberOfFrames", 2) if i == 1 else None, None, "multi-frame DICOM file .2 frames.: convert"),
        (lambda i, d: setattr(d, "PhotometricInterpretation", "RGB") if i == 0 else None, None, "RGB .colour. image"),
        (lambda i, d: setattr(d, "ImagePositionPatient", [0.0, 0.0, 10.0]) if i in (1, 2) else None, None,
         "share a position"),
        (None, {0, 1, 3, 4}, r"slice spacing varies from 5.00 to 10.00 mm"),
        (lambda i, d: setattr(d, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), None, "not an axial series"),
    ],
    ids=["multi-frame", "colour", "duplicated-position", "uneven-spacing", "sagittal"],
)
def test_archive_edge_cases_are_refused_in_one_line(series, tmp_path, change, keep, message):
    root, _ = series
    folder = copy_series(root / "ct_scan_2", tmp_path / "case", change, keep)
    with pytest.raises(Cov3dError, match=message) as error:
        scan_sources(folder)
    assert "\n" not in str(error.value)


def test_gantry_tilt_is_used_and_logged(series, tmp_path, logged):
    root, hu = series

    def straight(index, dataset):
        dataset.ImagePositionPatient = [-158.1, -179.0, 100.0 - SLICE_GAP_MM * index]

    def tilted(index, dataset):
        dataset.ImagePositionPatient = [-158.1, -179.0 + SLICE_GAP_MM * index * np.tan(np.radians(15)), 100.0 - SLICE_GAP_MM * index]

    reference = preprocess_scan(copy_series(root / "ct_scan_2", tmp_path / "straight", straight), *hu.shape)
    volume = preprocess_scan(copy_series(root / "ct_scan_2", tmp_path / "tilted", tilted), *hu.shape)
    assert torch_equal(volume, reference)
    assert "gantry tilt of 15.0 degrees" in logged.text


def test_missing_positions_fall_back_to_instance_numbers(series, tmp_path):
    root, hu = series

    def numbered(index, dataset):
        del dataset.ImagePositionPatient
        dataset.InstanceNumber = index + 1

    folder = copy_series(root / "ct_scan_2", tmp_path / "numbered", numbered)
    assert torch_equal(preprocess_scan(folder, *hu.shape), preprocess_scan(root / "ct_scan_2", *hu.shape))


def test_the_window_keys_the_cache_of_hu_scans_only(series, tmp_path):
    """A JPEG volume, grey levels already, is the same under any window: another --window finds its
    entry (keyed as every JPEG entry was before windows existed); a DICOM volume is made again."""
    root, hu = series
    size = (N_SLICES, *hu.shape[1:])
    default, other = VolumeShape(*size), VolumeShape(*size, window=Window(-600, 1500))
    jpeg, dicom = root / "ct_scan_1", root / "ct_scan_2"
    for scan in (jpeg, dicom):
        assert VolumeCache(tmp_path, default).update(scan)
    assert VolumeCache(tmp_path, default).path_for(jpeg) == entry_path(tmp_path, default, jpeg)  # the old key
    assert VolumeCache(tmp_path, other).path_for(jpeg) == VolumeCache(tmp_path, default).path_for(jpeg)
    assert not VolumeCache(tmp_path, other).update(jpeg)
    assert torch.equal(VolumeCache(tmp_path, other).checked_levels(jpeg), VolumeCache(tmp_path, default).levels(jpeg))
    assert VolumeCache(tmp_path, other).path_for(dicom) != VolumeCache(tmp_path, default).path_for(dicom)
    assert VolumeCache(tmp_path, other).update(dicom)
    assert not torch.equal(VolumeCache(tmp_path, other).levels(dicom), VolumeCache(tmp_path, default).levels(dicom))
