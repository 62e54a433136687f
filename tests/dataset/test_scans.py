"""Tests for cov3d.dataset.scans: scan names, slice order, reading messy slices, finding scans."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cov3d.dataset.scans import NO_SCAN_NUMBER, find_scans, is_jpeg_scan_dir, list_slices, read_slice, scan_number
from cov3d.errors import Cov3dError


def write_png_as_jpg(path: Path, array: np.ndarray) -> Path:
    """Lossless PNG data under a .jpg name (PIL opens by content): exact expected values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def make_scan(folder: Path, n_slices: int = 2) -> Path:
    """A scan folder of n small grey slices."""
    for index in range(n_slices):
        write_png_as_jpg(folder / f"{index}.jpg", np.full((4, 4), index, dtype=np.uint8))
    return folder


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("name", "number"),
    [("ct_scan_12", 12), ("ct_scan7", 7), ("test_ct_scan_3", 3), ("ct_scan_0", 0), ("scan", NO_SCAN_NUMBER)],
)
def test_scan_number(name: str, number: int) -> None:
    assert scan_number(name) == number


def test_list_slices_numeric_order_ignores_other_files(tmp_path: Path) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 12)
    for name in (".5.jpg", "._3.jpg", "notes.txt", "3a.jpg", "Thumbs.db", "7.png", "-1.jpg"):
        (scan / name).write_bytes(b"not a slice")
    (scan / "12.jpg").mkdir()
    assert [path.name for path in list_slices(scan)] == [f"{index}.jpg" for index in range(12)]


def test_list_slices_accepts_upper_case_and_jpeg(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    for name in ("2.JPG", "10.jpeg", "1.jpg"):
        write_png_as_jpg(scan / name, np.zeros((2, 2), np.uint8))
    assert [path.name for path in list_slices(scan)] == ["1.jpg", "2.JPG", "10.jpeg"]


def test_list_slices_errors(tmp_path: Path) -> None:
    empty = tmp_path / "ct_scan_3"
    empty.mkdir()
    (empty / "readme.txt").write_text("no slices")
    with pytest.raises(Cov3dError, match="No CT slices") as error:
        list_slices(empty)
    assert_one_line_naming(error, empty)
    with pytest.raises(Cov3dError, match="does not exist") as error:
        list_slices(tmp_path / "missing")
    assert_one_line_naming(error, tmp_path / "missing")
    with pytest.raises(Cov3dError, match="not a folder"):
        list_slices(empty / "readme.txt")


def test_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission errors (simulated: the tests may run as root, which ignores permissions)."""
    scan = make_scan(tmp_path / "ct_scan_1")
    real_scandir = os.scandir

    def scandir(path: object) -> object:
        if isinstance(path, (str, os.PathLike)) and Path(path) == scan:  # rmtree passes file descriptors
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(Cov3dError, match="Cannot read folder .*Permission denied") as error:
        list_slices(scan)
    assert_one_line_naming(error, scan)
    assert not is_jpeg_scan_dir(scan)
    with pytest.raises(Cov3dError, match="Cannot read folder"):
        find_scans([tmp_path])


def test_read_slice_grey_is_exact(tmp_path: Path) -> None:
    array = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    image = read_slice(write_png_as_jpg(tmp_path / "0.jpg", array))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), array)


def test_read_slice_rgb_is_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (100, 150, 200)
    grey = np.asarray(read_slice(write_png_as_jpg(tmp_path / "0.jpg", rgb)))
    expected = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))  # ITU-R 601-2 luma
    np.testing.assert_allclose(grey, expected, atol=1)


def test_read_slice_real_rgb_jpeg(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8) + np.array([200, 100, 50], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "0.jpg", quality=95)
    grey = np.asarray(read_slice(tmp_path / "0.jpg"))
    assert abs(grey.mean() - (0.299 * 200 + 0.587 * 100 + 0.114 * 50)) < 2


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_read_slice_16bit_scaled_by_type_max(tmp_path: Path, mode: str) -> None:
    values = np.array([[0, 257, 1000, 32768], [40000, 65535, 65535, 12345]])
    dtype = np.uint16 if mode == "I;16" else np.int32
    image = Image.fromarray(values.astype(dtype))
    path = tmp_path / "0.jpg"
    image.save(path, format="PNG" if mode == "I;16" else "TIFF")
    with Image.open(path) as stored:
        assert stored.mode in ("I;16", "I")
    grey = np.asarray(read_slice(path))
    np.testing.assert_array_equal(grey, np.rint(values * 255 / 65535).astype(np.uint8))


def test_read_slice_draft_downscales_jpeg(tmp_path: Path) -> None:
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)).save(tmp_path / "0.jpg")
    assert read_slice(tmp_path / "0.jpg", draft_size=(16, 16)).size == (16, 16)
    assert read_slice(tmp_path / "0.jpg", draft_size=(40, 40)).size == (64, 64)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"hello, not an image" * 5, "cannot identify"), (None, "truncated")],
)
def test_read_slice_bad_files(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "3.jpg"
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(Cov3dError, match=reason) as error:
        read_slice(path)
    assert_one_line_naming(error, path)
    assert "Replace or delete" in str(error.value)


def test_read_slice_broken_link(tmp_path: Path) -> None:
    link = tmp_path / "scan" / "0.jpg"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "gone.jpg")
    assert list_slices(link.parent) == [link]
    with pytest.raises(Cov3dError, match="No such file") as error:
        read_slice(link)
    assert_one_line_naming(error, link)


def test_is_jpeg_scan_dir(tmp_path: Path) -> None:
    assert is_jpeg_scan_dir(make_scan(tmp_path / "ct_scan_1"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.jpg").write_bytes(b"x")
    assert not is_jpeg_scan_dir(tmp_path / "other")
    assert not is_jpeg_scan_dir(tmp_path / "missing")
    assert not is_jpeg_scan_dir(tmp_path / "other" / "a.jpg")


def test_find_scans_sorted_recursive(tmp_path: Path) -> None:
    data = tmp_path / "DATA"
    for name in ("ct_scan_12", "ct_scan7", "ct_scan_2"):
        make_scan(data / "train" / "covid" / name)
    make_scan(data / "train" / "non-covid" / "ct_scan_1")
    make_scan(data / "validation" / "covid" / "ct_scan_0")
    make_scan(data / ".trash" / "ct_scan_99")
    (data / "train" / "empty").mkdir()
    (data / "train" / "covid" / "ct_scan_2" / "sub").mkdir()
    (data / "loop").symlink_to(data, target_is_directory=True)
    found = find_scans([data])
    assert [str(path.relative_to(data)) for path in found] == [
        "train/covid/ct_scan_2",
        "train/covid/ct_scan7",
        "train/covid/ct_scan_12",
        "train/non-covid/ct_scan_1",
        "validation/covid/ct_scan_0",
    ]
    single = data / "train" / "covid" / "ct_scan7"
    assert find_scans([single, single, data / "train" / "covid"]) == found[:3]


def test_find_scans_errors(tmp_path: Path) -> None:
    with pytest.raises(Cov3dError, match="does not exist") as error:
        find_scans([tmp_path / "missing"])
    assert_one_line_naming(error, tmp_path / "missing")
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(Cov3dError, match="No scan folders") as error:
        find_scans([tmp_path / "empty"])
    assert_one_line_naming(error, tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(Cov3dError, match="not a folder"):
        find_scans([tmp_path / "file.txt"])
