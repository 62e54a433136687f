"""CT scans stored as DICOM series or NIfTI volumes, read as 8-bit grey slices like the JPEG data.

Both hold Hounsfield units, mapped to grey levels through a ``cov3d.window.Window``; the slices then
follow the JPEG path of ``cov3d.preprocessing.preprocess``, so a DICOM or NIfTI copy of a JPEG scan
gives the same volume up to the JPEG compression. Slices come head first, rows anterior -> posterior,
columns patient right -> left, as in the JPEG data; what real archives hold and how each case is read
or refused is in docs/inference.md (and in the docstrings of ``_slice_order``, ``_check_geometry``
and ``_nifti_grey``). The readers are optional: ``cov3d[dicom]`` (pydicom), ``cov3d[nifti]`` (nibabel).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from cov3d.dataset.domain import ScanMeasure
from cov3d.dataset.scans import (
    MAX_8BIT,
    is_dicom_dir,
    is_jpeg_scan_dir,
    is_nifti_file,
    list_slices,
    looks_dicom,
    visible_files,
)
from cov3d.errors import Cov3dError, one_line
from cov3d.window import DEFAULT_WINDOW, Window

__all__ = ["ScanSources", "dicom_series_files", "grey_slices", "hu_to_uint8", "scan_sources"]

logger = logging.getLogger(__name__)

HU_MINIMUM_BELOW = -500.0
"""A NIfTI volume whose minimum is below this holds HU (air is -1000 HU, no grey level is negative)."""

EXTRAS = {"pydicom": ("dicom", "DICOM series"), "nibabel": ("nifti", "NIfTI files")}
"""Optional packages: the pip extra that installs each, and what it reads."""

GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
"""Photometric interpretations of grey images (both hold HU after the rescale)."""
SPACING_TOLERANCE = 0.1
"""Slice spacings may differ by this share of the median spacing (rounding, table jitter)."""
DUPLICATE_POSITION_MM = 0.01
"""Slices closer than this along the normal are at the same position."""
MAX_AXIAL_ANGLE_DEG = 45.0
"""Largest angle between the slice normal and the body (z) axis of an axial series."""
TILT_NOTE_DEG = 0.5
"""Gantry tilts from this angle on are logged."""


def hu_to_uint8(hu: np.ndarray, window: Window = DEFAULT_WINDOW) -> np.ndarray:
    """Map HU to 8-bit grey levels through ``window`` (default ``DEFAULT_WINDOW``); any shape in,
    same shape uint8 out."""
    return window.to_uint8(hu)


NON_FINITE_REMEDY = (
    "cov3d predicts only from finite values: write the volume again with a number (e.g. air, -1000 HU) where it "
    "holds none, or leave the scan out."
)
"""What to do about a scan with NaN or infinite voxels."""


def refuse_non_finite(path: Path, values: np.ndarray) -> None:
    """Raise ``Cov3dError`` for a scan whose voxels (``values``, any shape, after the rescale) are not
    all finite, counting the bad ones; callers check their minimum and maximum first (both finite
    exactly when every voxel is)."""
    with np.errstate(all="ignore"):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    what = "all" if bad == values.size else f"{bad:,} of"
    raise Cov3dError(f"{path}: {what} {values.size:,} voxels are not finite (NaN or infinity). {NON_FINITE_REMEDY}")


def _optional(package: str) -> ModuleType:
    """Import an optional reader, or explain how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        extra, what = EXTRAS[package]
        raise Cov3dError(
            f"Reading {what} needs {package}: pip install 'cov3d[{extra}]' (or pip install {package})."
        ) from None


def _positions(headers: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Slice normal (3,) and each slice's position (n, 3) in mm, or ``None`` if any slice lacks them."""
    try:
        orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.array([np.asarray(h.ImagePositionPatient, dtype=np.float64) for h in headers])
    except (AttributeError, TypeError, ValueError):
        return None
    norm = float(np.linalg.norm(normal))
    if positions.shape != (len(headers), 3) or not np.isfinite(positions).all() or not norm > 0:
        return None
    return normal / norm, positions


def _check_geometry(folder: Path, normal: np.ndarray, positions: np.ndarray) -> None:
    """Refuse non-axial series, duplicated positions and uneven spacing; log a gantry tilt
    (positions sorted along the normal, shape (n, 3))."""
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > MAX_AXIAL_ANGLE_DEG:
        raise Cov3dError(
            f"{folder} is not an axial series (slice normal {angle:.0f} degrees from the body axis): "
            "give axial slices."
        )
    if len(positions) < 2:
        return
    along = positions @ normal
    steps = np.diff(along)
    duplicated = np.flatnonzero(np.abs(steps) < DUPLICATE_POSITION_MM)
    if duplicated.size:
        raise Cov3dError(
            f"{folder}: {duplicated.size + 1} or more slices share a position ({along[duplicated[0]]:.2f} mm along "
            "the slice normal): remove the duplicated slices or split the acquisitions into folders."
        )
    spacing = np.abs(steps)
    median = float(np.median(spacing))
    if spacing.max() - spacing.min() > SPACING_TOLERANCE * median:
        raise Cov3dError(
            f"{folder}: slice spacing varies from {spacing.min():.2f} to {spacing.max():.2f} mm (missing slices or "
            "mixed acquisitions): resample it to even spacing (e.g. as NIfTI) or give a complete series."
        )
    step = positions[-1] - positions[0]
    tilt = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step)))))
    if tilt >= TILT_NOTE_DEG:
        logger.info("%s: gantry tilt of %.1f degrees; slices used as stored (volume sheared by the tilt).", folder, tilt)


def _slice_order(headers: list, files: list[Path], folder: Path | None = None) -> list[int]:
    """Indices of ``headers`` in slice order; checks the geometry. The order is the position along the
    slice normal (``ImagePositionPatient`` projected on the cross product of the two
    ``ImageOrientationPatient`` directions), head first (decreasing patient z); if any slice lacks
    position or orientation, ``InstanceNumber``, then the file name."""
    geometry = _positions(headers)
    if geometry is None:
        keys = [int(getattr(header, "InstanceNumber", 0) or 0) for header in headers]
        return sorted(range(len(headers)), key=lambda i: (keys[i], files[i].name))
    normal, positions = geometry
    along = positions @ normal
    keys = -along if normal[2] >= 0 else along
    order = sorted(range(len(headers)), key=lambda i: (keys[i], files[i].name))
    _check_geometry(folder or files[0].parent, normal, positions[order])
    return order


def _series_label(uid: str, headers: list) -> str:
    description = str(getattr(headers[0], "SeriesDescription", "") or "").strip()
    return f"{uid or '(no UID)'}{f' {description!r}' if description else ''} ({len(headers)} slices)"


def _pick_series(folder: Path, series: dict[str, list[int]], headers: list) -> list[int]:
    """The indices of the series with the most slices; a tie is refused, listing the series."""
    if len(series) == 1:
        return next(iter(series.values()))
    ranked = sorted(series.items(), key=lambda item: -len(item[1]))
    listing = "; ".join(_series_label(uid, [headers[i] for i in members]) for uid, members in ranked)
    if len(ranked[0][1]) == len(ranked[1][1]):
        raise Cov3dError(f"{folder} holds {len(series)} DICOM series of equal size: {listing}. Put each in its own folder.")
    logger.warning("%s holds %d DICOM series; using the largest: %s", folder, len(series), listing)
    return ranked[0][1]


def dicom_series_files(folder: Path) -> list[Path]:
    """The image files of the DICOM series in ``folder`` (the largest, if several), in slice order.

    Raises ``Cov3dError`` if pydicom is missing, a DICOM file is unreadable, the folder holds no
    image, or the series is one that cov3d refuses (see the module docstring).
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
    series: dict[str, list[int]] = {}
    for index, header in enumerate(headers):
        series.setdefault(str(getattr(header, "SeriesInstanceUID", "")), []).append(index)
    chosen = _pick_series(folder, series, headers)
    files, headers = [files[i] for i in chosen], [headers[i] for i in chosen]
    for path, header in zip(files, headers):
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
        if frames > 1:
            raise Cov3dError(
                f"{path} is a multi-frame DICOM file ({frames} frames): convert it to one slice per file or to "
                "NIfTI (e.g. with dcm2niix)."
            )
        photometric = str(getattr(header, "PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
        if photometric not in GREY_PHOTOMETRICS:
            raise Cov3dError(f"{path} is a {photometric} (colour) image, not CT: give grey CT slices.")
    return [files[i] for i in _slice_order(headers, files, folder)]


def _dicom_grey(path: Path, window: Window, measure: ScanMeasure | None = None) -> np.ndarray:
    """One DICOM slice as (rows, columns) uint8 through ``window`` (MONOCHROME1 too: its rescaled
    values are HU like MONOCHROME2's); ``measure`` sees its HU and geometry."""
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
    with np.errstate(all="ignore"):  # non-finite values are refused just below
        hu = pixels.astype(np.float32) * slope + intercept
    if not (math.isfinite(hu.min()) and math.isfinite(hu.max())):
        refuse_non_finite(path, hu)
    if measure is not None:
        measure.note_dicom_geometry(dataset)
        measure.add_hu(hu)
    return hu_to_uint8(hu, window)


def _nifti_ras(path: Path) -> tuple[np.ndarray, float, float, float]:
    """The stored voxels reoriented to RAS (a view, unscaled), the header's (slope, intercept) and
    the volume of a voxel in mm^3 (from the affine)."""
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
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(image.affine, dtype=np.float64)[:3, :3])))
    return orientations.apply_orientation(raw, to_ras), slope, intercept, voxel_mm3


def _nifti_grey(path: Path, window: Window, measure: ScanMeasure | None = None) -> tuple[int, Iterator[np.ndarray]]:
    """Slice count and the slices of a NIfTI volume as (rows, columns) uint8, head first.

    The voxel axes are reoriented to the closest RAS+ axes of the affine (flips and transposes, no
    resampling); with (i, j, k) those axes, slice d is k = K-1-d and its pixel (row, column) is
    (i, j) = (I-1-column, J-1-row). Values (after scl_slope/scl_inter) are HU, mapped through
    ``window``, when the minimum is below ``HU_MINIMUM_BELOW``; otherwise grey levels already, in
    [0, 1] when the maximum is at most 1, else 0..255, rounded and clipped. A volume with NaN or
    infinite voxels is refused (``refuse_non_finite``). ``measure`` sees the HU slices, or is told the
    range of values that are not HU (``cov3d.dataset.domain``: not a CT in HU)."""
    ras, slope, intercept, voxel_mm3 = _nifti_ras(path)
    with np.errstate(all="ignore"):  # non-finite values are refused just below
        low, high = sorted((float(ras.min()) * slope + intercept, float(ras.max()) * slope + intercept))
        if not (math.isfinite(low) and math.isfinite(high)):
            refuse_non_finite(path, ras * slope + intercept)
    depth = ras.shape[2]
    holds_hu = low < HU_MINIMUM_BELOW
    if measure is not None:
        measure.voxel_mm3 = voxel_mm3 if voxel_mm3 > 0 and math.isfinite(voxel_mm3) else None
        if not holds_hu:
            measure.values = f"from {low:g} to {high:g}"
            measure = None

    def slices() -> Iterator[np.ndarray]:
        for k in range(depth - 1, -1, -1):
            values = ras[::-1, ::-1, k].T.astype(np.float32) * slope + intercept
            if holds_hu:
                if measure is not None:
                    measure.add_hu(values)
                yield hu_to_uint8(values, window)
            else:
                scale = MAX_8BIT if high <= 1.0 else 1.0
                yield np.clip(np.rint(values * scale), 0, MAX_8BIT).astype(np.uint8)

    return depth, slices()


def grey_slices(
    kind: str, files: list[Path], window: Window = DEFAULT_WINDOW, measure: ScanMeasure | None = None,
) -> tuple[int, Iterator[np.ndarray]]:
    """Slice count and slices (rows, columns) uint8 of a DICOM series (kind "dicom", ``files`` from
    ``dicom_series_files``) or a NIfTI volume (kind "nifti", ``files`` = [the file]), HU through
    ``window`` (default ``DEFAULT_WINDOW``). ``measure`` (``cov3d.dataset.domain``) sees each slice
    as it is read."""
    if kind == "nifti":
        return _nifti_grey(files[0], window, measure)
    return len(files), map(functools.partial(_dicom_grey, window=window, measure=measure), files)


@dataclass
class ScanSources:
    """What a scan is read from: ``kind`` ("jpeg", "dicom" or "nifti") and its files in slice
    order (JPEG slices, the DICOM series, or the NIfTI file itself). The files fingerprint the
    scan's cache entries."""

    kind: str
    files: list[Path]

    @property
    def holds_hu(self) -> bool:
        """Whether the scan holds HU (DICOM, NIfTI), which a window maps to grey levels."""
        return self.kind != "jpeg"


def scan_sources(scan: Path) -> ScanSources:
    """The ``ScanSources`` of a JPEG scan folder, a DICOM series folder or a NIfTI file.

    Raises ``Cov3dError`` naming the scan if it cannot be listed.
    """
    scan = Path(scan)
    if is_nifti_file(scan):
        return ScanSources("nifti", [scan])
    if not is_jpeg_scan_dir(scan) and is_dicom_dir(scan):
        return ScanSources("dicom", dicom_series_files(scan))
    return ScanSources("jpeg", list_slices(scan))
