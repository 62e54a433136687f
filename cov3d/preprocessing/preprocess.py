"""Preprocessing CT scans into fixed-size volumes (paper section 3.1), and the cache of them.

``preprocess_scan`` turns a scan of n slices into a float32 volume ``(1, D, H, W)`` in [0, 1]: each
slice is read as 8-bit grey (JPEG, or DICOM/NIfTI HU through a window: ``cov3d.dataset.dicom_nifti``)
and resized bicubically to H x W as soon as it is decoded (``resize_slice``; ``fast_decode`` lets
libjpeg decode at reduced scale first), then the stack is interpolated to exactly D slices with a
cubic spline (``depth_interpolation_matrix``, ``interpolate_depth``) and divided by 255. ``warp``
adds the original code's cubic coordinate warp (``warp_slice``; not in the paper, off by default).
``VolumeCache`` stores one file of uint8 levels per scan and shape (``cov3d.preprocessing.cache``);
``cov3d.preprocessing.workers.preprocess_many`` fills it for many scans. docs/preprocessing.md has the
details, docs/benchmarks.md the timings.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.interpolate import CubicSpline
from scipy.ndimage import map_coordinates

from cov3d.dataset.dicom_nifti import ScanSources, grey_slices, scan_sources
from cov3d.dataset.domain import ScanMeasure
from cov3d.dataset.scans import MAX_8BIT, read_slice
from cov3d.errors import Cov3dError
from cov3d.limits import WARP
from cov3d.preprocessing.cache import (
    LEVELS,
    STORAGE_DTYPE,
    default_cache_dir,
    empty_tensor,
    entry_path,
    from_levels,
    load_valid_entry,
    load_valid_volume,
    make_entry,
    save_cache_entry,
    source_fingerprint,
)
from cov3d.settings import VolumeShape
from cov3d.window import DEFAULT_WINDOW, Window

__all__ = [
    "VolumeCache",
    "cubic_warp",
    "default_cache_dir",
    "depth_interpolation_matrix",
    "interpolate_depth",
    "preprocess_scan",
    "resize_slice",
    "scan_sources",
    "warp_slice",
]


MATMUL_BLOCK_BYTES = 4 * 2**20
"""Float32 bytes of stack columns per block of the depth product (about a core's L2 cache)."""

COLUMN_ALIGN = 64
"""Column blocks of the depth product are a multiple of this many pixels."""

WEIGHT_TOLERANCE = 1e-6
"""Depth-interpolation weights smaller than this are dropped (see ``_weight_bands``)."""

ROW_GROUP = 8
"""Output slices per band of the depth product (see ``_weight_bands``)."""

BAND_CACHE_SIZE = 256
"""(n, depth) pairs whose banded depth matrices are kept (each well under 1 MB)."""


def cubic_warp(u: np.ndarray, warp: float) -> np.ndarray:
    """The original code's coordinate warp f u^3 + (1 - f) u of positions u in [-1, 1]."""
    return warp * u**3 + (1.0 - warp) * u


def warp_slice(pixels: np.ndarray, warp: float) -> np.ndarray:
    """An (H0, W0) uint8 slice resampled on the warped grid; same shape and dtype.

    The pixel coordinates (w(u) + 1) W0 / 2 for u in ``linspace(-1, 1, W0)`` (and likewise for H0),
    with w the ``cubic_warp``, are sampled with ``scipy.ndimage.map_coordinates`` at its defaults
    (cubic, 0 outside), as the original code (rbturnbull/cov3d at c562971) did: its (u + 1) W0 / 2
    rather than (W0 - 1) / 2 shifts the image by half a pixel and darkens the last row and column."""
    height, width = pixels.shape
    rows = (cubic_warp(np.linspace(-1.0, 1.0, height), warp) + 1.0) * height / 2
    columns = (cubic_warp(np.linspace(-1.0, 1.0, width), warp) + 1.0) * width / 2
    return map_coordinates(pixels, np.meshgrid(rows, columns, indexing="ij"))


def _check_size(depth: int, height: int, width: int) -> None:
    """Raise ``Cov3dError`` unless all sizes are positive integers."""
    if min(depth, height, width) < 1:
        raise Cov3dError(f"Volume sizes must be positive, got depth {depth}, height {height}, width {width}.")


def depth_interpolation_matrix(n_slices: int, depth: int, warp: float = 0.0) -> np.ndarray:
    """The (depth, n_slices) float64 matrix that maps n evenly spaced slices to ``depth`` by
    cubic-spline interpolation: scipy's ``CubicSpline`` (not-a-knot ends) of the identity through
    slice k at k / (n - 1), evaluated at j / (depth - 1). The spline is linear in the data, so this
    matrix is the whole interpolation. 2 slices give a straight line, 3 a parabola, 1 slice is
    repeated. With ``warp`` > 0, the spline is fitted at ``linspace(-1, 1, n)`` and evaluated at the
    ``cubic_warp`` of ``linspace(-1, 1, depth)``."""
    if n_slices < 1 or depth < 1:
        raise ValueError(f"need n_slices >= 1 and depth >= 1, got {n_slices} and {depth}")
    if n_slices == 1:
        return np.ones((depth, 1))
    if warp:
        spline = CubicSpline(np.linspace(-1.0, 1.0, n_slices), np.eye(n_slices), axis=0)
        return spline(cubic_warp(np.linspace(-1.0, 1.0, depth), warp))
    spline = CubicSpline(np.linspace(0.0, 1.0, n_slices), np.eye(n_slices), axis=0)
    return spline(np.linspace(0.0, 1.0, depth))


def resize_slice(image: Image.Image, height: int, width: int) -> np.ndarray:
    """An 8-bit grey slice resized bicubically (PIL) to an (height, width) uint8 array."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


@functools.lru_cache(maxsize=BAND_CACHE_SIZE)
def _weight_bands(n_slices: int, depth: int, scale: float, warp: float = 0.0) -> tuple[tuple[slice, slice, torch.Tensor], ...]:
    """The depth matrix times ``scale`` in float32, split into groups of ``ROW_GROUP`` output
    rows, each with the range of input slices its weights cover: ``(rows, slices, weights[rows, slices])``.

    The spline weights decay geometrically (by about 2 - sqrt(3) per slice) away from the output
    position; weights below ``WEIGHT_TOLERANCE`` are dropped, which changes no output by more
    than about 2e-6 on the [0, 1] scale (a two-thousandth of an 8-bit grey level) and leaves each
    row group a band of about 22 + ROW_GROUP * n / depth slices instead of all n. Dropping them
    also avoids float32 subnormal numbers, which would make the product several times slower.
    Cached per (n, depth, scale, warp): building it for a long scan is costly (docs/benchmarks.md).
    """
    matrix = depth_interpolation_matrix(n_slices, depth, warp)
    matrix[np.abs(matrix) < WEIGHT_TOLERANCE] = 0.0
    weights = (matrix * scale).astype(np.float32)
    bands = []
    for start in range(0, depth, ROW_GROUP):
        rows = slice(start, min(start + ROW_GROUP, depth))
        used = np.flatnonzero(np.any(weights[rows] != 0.0, axis=0))
        first, last = (used[0], used[-1]) if used.size else (0, 0)
        band = slice(int(first), int(last) + 1)
        bands.append((rows, band, torch.from_numpy(np.ascontiguousarray(weights[rows, band]))))
    return tuple(bands)


def interpolate_depth(stack: np.ndarray, depth: int, *, levels: bool = False, warp: float = 0.0) -> torch.Tensor:
    """Cubic-spline interpolation (at warped positions if ``warp`` > 0) of an (n, H, W) uint8 stack
    to a (1, depth, H, W) volume:
    float32 in [0, 1], or with ``levels`` the cache's uint8 levels round(255 v) of that volume
    (``cov3d.preprocessing.cache``), computed without the float32 volume.

    One matrix product (depth, n) @ (n, H*W), evaluated in blocks of columns (pixels) whose
    float32 copy fits in ``MATMUL_BLOCK_BYTES``, skipping the zero blocks of the matrix
    (``_weight_bands``), clipped block by block. A float32 product goes straight into the
    output. For levels the stack gets + 0.5 as it is converted to float32 (each row of weights
    sums to 1, so the product gets + 0.5 too) and one numpy pass clips the block to [0, 255]
    and truncates it to uint8 in the output: rounding to the nearest level, ties up.
    """
    n_slices, height, width = stack.shape
    pixels = height * width
    bands = _weight_bands(n_slices, depth, 1.0 if levels else 1.0 / MAX_8BIT, warp)
    columns = stack.reshape(n_slices, pixels)
    block = max(COLUMN_ALIGN, MATMUL_BLOCK_BYTES // (4 * n_slices) // COLUMN_ALIGN * COLUMN_ALIGN)
    data = torch.empty(n_slices * min(block, pixels), dtype=torch.float32)
    volume = empty_tensor((depth, pixels), STORAGE_DTYPE if levels else torch.float32)
    result = torch.empty(depth * min(block, pixels), dtype=torch.float32) if levels else None
    for start in range(0, pixels, block):
        stop = min(start + block, pixels)
        data_block = data[: n_slices * (stop - start)].view(n_slices, stop - start)
        np.add(columns[:, start:stop], np.float32(0.5 if levels else 0.0), out=data_block.numpy())
        if levels:
            result_block = result[: depth * (stop - start)].view(depth, stop - start)
        else:
            result_block = volume[:, start:stop]
        for rows, band, weights in bands:
            torch.mm(weights, data_block[band], out=result_block[rows])
        if levels:
            np.clip(result_block.numpy(), 0.0, LEVELS, out=volume.numpy()[:, start:stop], casting="unsafe")
        else:
            result_block.clamp_(0.0, 1.0)
    return volume.reshape(1, depth, height, width)


def _preprocess_slices(
    sources: ScanSources, depth: int, height: int, width: int, fast_decode: bool, *, levels: bool = False,
    warp: float = 0.0, window: Window = DEFAULT_WINDOW, measure: ScanMeasure | None = None,
) -> torch.Tensor:
    """``preprocess_scan`` for a scan's sources; uint8 levels instead with ``levels``. ``measure``
    sees each slice as it is read (``cov3d.dataset.domain``)."""
    if sources.kind == "jpeg":
        draft_size = (width, height) if fast_decode else None
        count = len(sources.files)
        images = (read_slice(path, draft_size=draft_size) for path in sources.files)
    else:
        count, greys = grey_slices(sources.kind, sources.files, window, measure)
        images = (Image.fromarray(grey) for grey in greys)
    stack = np.empty((count, height, width), dtype=np.uint8)
    if measure is not None:
        measure.expect(count)
    for index, image in enumerate(images):
        if measure is not None and sources.kind == "jpeg":
            measure.add_grey(np.asarray(image, dtype=np.uint8))
        if warp:
            image = Image.fromarray(warp_slice(np.asarray(image, dtype=np.uint8), warp))
        stack[index] = resize_slice(image, height, width)
    return interpolate_depth(stack, depth, levels=levels, warp=warp)


def preprocess_scan(
    scan_dir: Path, depth: int, height: int, width: int, *, fast_decode: bool = False, warp: float = 0.0,
    window: Window = DEFAULT_WINDOW, measure: ScanMeasure | None = None,
) -> torch.Tensor:
    """A scan (JPEG or DICOM folder, NIfTI file) as a float32 volume (1, depth, height, width) in [0, 1];
    DICOM and NIfTI HU through ``window``.

    ``fast_decode``: libjpeg downscales in the DCT domain (``Image.draft``) to the smallest
    power-of-two reduction still at least height x width before the bicubic resize; the volume then
    differs slightly from the normal path, most near sharp edges (bounded in the tests).

    ``warp``: the original code's cubic coordinate warp factor (0: none, the paper; 0.5: the original's).
    ``measure``: a ``cov3d.dataset.domain.ScanMeasure`` that sees the slices as they are read.
    Raises ``Cov3dError`` naming the folder or file if the scan cannot be read.
    """
    _check_size(depth, height, width)
    warp = float(WARP.check("warp", warp))
    return _preprocess_slices(scan_sources(Path(scan_dir)), depth, height, width, fast_decode, warp=warp,
                              window=window, measure=measure)


class VolumeCache:
    """Preprocessed volumes of one ``shape`` (``cov3d.settings.VolumeShape``), stored in ``cache_dir``
    (format: ``cov3d.preprocessing.cache``). The window is part of an entry's key only for scans in
    HU (``VolumeShape.stored_as``): JPEG volumes are shared by every window."""

    def __init__(self, cache_dir: Path, shape: VolumeShape):
        self.cache_dir = Path(cache_dir).expanduser()
        self.shape = shape

    def __repr__(self) -> str:
        return f"VolumeCache({str(self.cache_dir)!r}, {self.shape!r})"

    def path_for(self, scan_dir: Path, sources: ScanSources | None = None) -> Path:
        """The cache file of ``scan_dir`` (which need not exist); lists the scan unless ``sources`` are given."""
        sources = scan_sources(Path(scan_dir)) if sources is None else sources
        return entry_path(self.cache_dir, self.shape.stored_as(sources.holds_hu), Path(scan_dir))

    def _stored(self, scan_dir: Path, sources: ScanSources) -> tuple[dict | None, str]:
        """The stored entry if current (else ``None``) and the source fingerprint."""
        fingerprint = source_fingerprint(sources.files)
        keyed = self.shape.stored_as(sources.holds_hu)
        return load_valid_entry(entry_path(self.cache_dir, keyed, scan_dir), keyed, scan_dir, fingerprint), fingerprint

    def _fetch(self, scan_dir: Path, sources: ScanSources | None = None) -> tuple[dict, bool]:
        """The entry (uint8 levels (1, D, H, W) and the scan's domain measures), loaded or built
        and stored, and whether it was built."""
        sources = scan_sources(scan_dir) if sources is None else sources
        stored, fingerprint = self._stored(scan_dir, sources)
        if stored is not None:
            return stored, False
        measure = ScanMeasure()
        volume = _preprocess_slices(
            sources, *self.shape.dims, self.shape.fast_decode, levels=True, warp=self.shape.warp,
            window=self.shape.window, measure=measure,
        )
        keyed = self.shape.stored_as(sources.holds_hu)
        entry = make_entry(volume, keyed, scan_dir, fingerprint, measure.result())
        save_cache_entry(entry_path(self.cache_dir, keyed, scan_dir), entry)
        return entry, True

    def load(self, scan_dir: Path) -> torch.Tensor | None:
        """The cached volume (1, D, H, W) float32, or ``None`` if missing, stale or damaged.

        Raises ``Cov3dError`` if the scan folder itself cannot be listed (its fingerprint is
        needed to tell whether the entry is current).
        """
        scan_dir = Path(scan_dir)
        stored, _ = self._stored(scan_dir, scan_sources(scan_dir))
        return None if stored is None else from_levels(stored["volume"])

    def checked_levels(self, scan_dir: Path) -> torch.Tensor:
        """The stored uint8 levels (1, D, H, W) of an entry that ``update`` made current
        earlier in this run, read without listing the scan again (the entry's own checks and
        CRC still hold); rebuilt from the scan if the entry has gone missing or been damaged.

        This is what a training loader reads on every item of every epoch. The scan is not listed, so
        the entry keyed for HU is tried first, then the one of JPEG slices (``VolumeShape.stored_as``).
        """
        scan_dir = Path(scan_dir)
        for keyed in dict.fromkeys(self.shape.stored_as(holds_hu) for holds_hu in (True, False)):
            stored = load_valid_volume(entry_path(self.cache_dir, keyed, scan_dir), keyed, scan_dir, fingerprint=None)
            if stored is not None:
                return stored
        return self.levels(scan_dir)

    def update(self, scan_dir: Path) -> bool:
        """Make sure a current entry exists; ``True`` if it had to be (re)built."""
        return self._fetch(Path(scan_dir))[1]

    def levels(self, scan_dir: Path, sources: ScanSources | None = None) -> torch.Tensor:
        """The stored uint8 levels (1, D, H, W), from the cache or preprocessed and stored.

        ``sources`` (``scan_sources(scan_dir)``) saves listing the scan again when the caller
        reads it at several sizes.
        """
        return self._fetch(Path(scan_dir), sources)[0]["volume"]

    def levels_and_domain(self, scan_dir: Path, sources: ScanSources | None = None) -> tuple[torch.Tensor, dict]:
        """``levels`` and the scan's domain measures (``cov3d.dataset.domain.ScanMeasure.result``),
        taken while the scan was read for the entry."""
        entry = self._fetch(Path(scan_dir), sources)[0]
        return entry["volume"], entry["domain"]

    def get(self, scan_dir: Path, sources: ScanSources | None = None) -> torch.Tensor:
        """The volume (1, D, H, W) float32: ``levels`` / 255.

        Always the stored values (``preprocess_scan`` rounded to 8-bit levels), so a fresh and
        a cached result are identical.
        """
        return from_levels(self.levels(scan_dir, sources))
