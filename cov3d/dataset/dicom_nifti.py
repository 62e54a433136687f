"""CT scans stored as DICOM series or NIfTI volumes, read as 8-bit gray slices like the JPEG data.

Both formats hold Hounsfield units (HU). They are mapped to 8-bit grey levels with the same lung
window as the synthetic JPEG data (``hu_to_uint8`` below: level ``WINDOW_LEVEL`` = -600 HU,
width ``WINDOW_WIDTH`` = 1500 HU, so -1350 HU -> 0 and +150 HU -> 255, rounded and clipped), then
follow the JPEG path of ``cov3d.preprocessing.preprocess`` (bicubic resize of each 8-bit slice, cubic spline along
depth, / 255 -> [0, 1]). A DICOM or NIfTI copy of a JPEG scan therefore gives the same volume up to
the JPEG compression of the latter.

**DICOM series** (``pip install cov3d[dicom]``, i.e. pydicom): a folder whose files are DICOM
(name ending ``.dcm``, or the ``DICM`` marker at byte 128). All image files must belong to one
series (one ``SeriesInstanceUID``). Slices are ordered by their position along the slice normal
(``ImagePositionPatient`` projected on the cross product of the two ``ImageOrientationPatient``
directions), head first (decreasing patient z, as in the synthetic scans, apex to base); if any
slice lacks position or orientation, by ``InstanceNumber``, then by file name. HU = stored pixel
value x ``RescaleSlope`` + ``RescaleIntercept`` (defaults 1 and 0). Rows and columns are used as
stored (DICOM's radiological view: rows anterior -> posterior, columns patient right -> left).

**NIfTI** (``pip install cov3d[nifti]``, i.e. nibabel): a ``.nii`` or ``.nii.gz`` file holding one
3-D volume (a 4-D one with a single volume is accepted). The voxel axes are first reoriented to the
closest RAS+ axes from the affine (flips and transposes only, no resampling); with ``(i, j, k)`` the
RAS axes, slice ``d`` of our ``(D, H, W)`` volume is ``k = K-1-d`` (head first) and its pixel
``(row, column)`` is ``(i, j) = (I-1-column, J-1-row)``: rows anterior -> posterior, columns patient
right -> left, as in DICOM and the JPEG data. Values (after the header's scl_slope/scl_inter) are HU
when the volume's minimum is below ``HU_MINIMUM_BELOW`` (-500; air is -1000 HU) and go through the
lung window; otherwise they are taken as grey levels already: ``[0, 1]`` when the maximum is at most
1, else ``0..255``, rounded and clipped.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from cov3d.dataset.scans import (
    MAX_8BIT,
    is_dicom_dir,
    is_nifti_file,
    is_scan_dir,
    list_slices,
    looks_dicom,
    visible_files,
)
from cov3d.errors import Cov3dError, one_line

__all__ = ["WINDOW_LEVEL", "WINDOW_WIDTH", "ScanSources", "dicom_series_files", "gray_slices", "hu_to_uint8", "scan_sources"]

# Lung window used to map HU to 8-bit grey levels (standard chest-CT lung window); the synthetic
# data (cov3d.synthetic) renders its JPEG slices through the same window.
WINDOW_LEVEL = -600.0
WINDOW_WIDTH = 1500.0

HU_MINIMUM_BELOW = -500.0
"""A NIfTI volume whose minimum is below this holds HU (air is -1000 HU, no grey level is negative)."""

EXTRAS = {"pydicom": ("dicom", "DICOM series"), "nibabel": ("nifti", "NIfTI files")}
"""Optional packages: the pip extra that installs each, and what it reads."""


def hu_to_uint8(hu: np.ndarray) -> np.ndarray:
    """Map HU to 8-bit grey levels through the lung window; any shape in, same shape uint8 out."""
    low = WINDOW_LEVEL - WINDOW_WIDTH / 2
    grey = (hu - low) * (255.0 / WINDOW_WIDTH)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _optional(package: str) -> ModuleType:
    """Import an optional reader, or explain how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        extra, what = EXTRAS[package]
        raise Cov3dError(
            f"Reading {what} needs {package}: pip install 'cov3d[{extra}]' (or pip install {package})."
        ) from None


def _slice_order(headers: list, files: list[Path]) -> list[int]:
    """Indices of ``headers`` in slice order (see the module docstring)."""
    try:
        keys = []
        for header in headers:
            orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
            normal = np.cross(orientation[:3], orientation[3:])
            position = float(np.dot(np.asarray(header.ImagePositionPatient, dtype=np.float64), normal))
            keys.append(-position if normal[2] >= 0 else position)
    except (AttributeError, TypeError, ValueError):
        keys = [int(getattr(header, "InstanceNumber", 0) or 0) for header in headers]
    return sorted(range(len(headers)), key=lambda i: (keys[i], files[i].name))


def dicom_series_files(folder: Path) -> list[Path]:
    """The image files of the DICOM series in ``folder``, in slice order.

    Raises ``Cov3dError`` if pydicom is missing, a DICOM file is unreadable, the folder holds no
    image or more than one series.
    """
    pydicom = _optional("pydicom")
    folder = Path(folder)
    files, headers = [], []
    for path in filter(looks_dicom, visible_files(folder)):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for damaged files
            raise Cov3dError(f"Cannot read DICOM file {path}: {one_line(error)}. Remove or replace it.") from None
        if "Rows" in header and "Columns" in header:
            files.append(path)
            headers.append(header)
    if not files:
        raise Cov3dError(f"No DICOM images in {folder}: check the path or remove the folder.")
    series = {str(getattr(header, "SeriesInstanceUID", "")) for header in headers}
    if len(series) > 1:
        raise Cov3dError(f"{folder} holds {len(series)} DICOM series: put each series in its own folder.")
    return [files[i] for i in _slice_order(headers, files)]


def _dicom_gray(path: Path) -> np.ndarray:
    """One DICOM slice as (rows, columns) uint8 through the lung window."""
    pydicom = _optional("pydicom")
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - missing codecs and damaged data raise many types
        raise Cov3dError(
            f"Cannot decode DICOM pixels of {path}: {one_line(error)}. "
            "Compressed series may need pylibjpeg or gdcm installed."
        ) from None
    if pixels.ndim != 2:
        raise Cov3dError(f"{path} is a multi-frame or colour DICOM image: give one 2-D slice per file.")
    slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
    intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
    return hu_to_uint8(pixels.astype(np.float32) * slope + intercept)


def _nifti_ras(path: Path) -> tuple[np.ndarray, float, float]:
    """The stored voxels reoriented to RAS (a view, unscaled) and the header's (slope, intercept)."""
    nibabel = _optional("nibabel")
    try:
        image = nibabel.load(str(path))
        proxy = image.dataobj
        if nibabel.is_proxy(proxy):
            raw = np.asanyarray(proxy.get_unscaled())
            slope, intercept = float(proxy.slope), float(proxy.inter)
        else:
            raw, slope, intercept = np.asanyarray(proxy), 1.0, 0.0
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise Cov3dError(f"Cannot read NIfTI file {path}: {one_line(error)}. Remove or replace it.") from None
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise Cov3dError(f"{path} holds a {raw.ndim}-D image: give one 3-D CT volume per NIfTI file.")
    orientations = nibabel.orientations
    to_ras = orientations.ornt_transform(orientations.io_orientation(image.affine), orientations.axcodes2ornt("RAS"))
    return orientations.apply_orientation(raw, to_ras), slope, intercept


def _nifti_gray(path: Path) -> tuple[int, Iterator[np.ndarray]]:
    """Slice count and the slices of a NIfTI volume as (rows, columns) uint8, head first."""
    ras, slope, intercept = _nifti_ras(path)
    low, high = sorted((float(ras.min()) * slope + intercept, float(ras.max()) * slope + intercept))
    depth = ras.shape[2]

    def slices() -> Iterator[np.ndarray]:
        for k in range(depth - 1, -1, -1):
            values = ras[::-1, ::-1, k].T.astype(np.float32) * slope + intercept
            if low < HU_MINIMUM_BELOW:
                yield hu_to_uint8(values)
            else:
                scale = MAX_8BIT if high <= 1.0 else 1.0
                yield np.clip(np.rint(values * scale), 0, MAX_8BIT).astype(np.uint8)

    return depth, slices()


def gray_slices(kind: str, files: list[Path]) -> tuple[int, Iterator[np.ndarray]]:
    """Slice count and slices (rows, columns) uint8 of a DICOM series (kind "dicom", ``files`` from
    ``dicom_series_files``) or a NIfTI volume (kind "nifti", ``files`` = [the file])."""
    if kind == "nifti":
        return _nifti_gray(files[0])
    return len(files), map(_dicom_gray, files)


@dataclass
class ScanSources:
    """What a scan is read from: ``kind`` ("jpeg", "dicom" or "nifti") and its files in slice
    order (JPEG slices, the DICOM series, or the NIfTI file itself). The files fingerprint the
    scan's cache entries."""

    kind: str
    files: list[Path]


def scan_sources(scan: Path) -> ScanSources:
    """The ``ScanSources`` of a JPEG scan folder, a DICOM series folder or a NIfTI file.

    Raises ``Cov3dError`` naming the scan if it cannot be listed.
    """
    scan = Path(scan)
    if is_nifti_file(scan):
        return ScanSources("nifti", [scan])
    if not is_scan_dir(scan) and is_dicom_dir(scan):
        return ScanSources("dicom", dicom_series_files(scan))
    return ScanSources("jpeg", list_slices(scan))
