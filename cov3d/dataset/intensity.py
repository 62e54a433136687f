"""The intensity mapping from Hounsfield units (HU) to 8-bit grey levels, calibrated to COV19-CT-DB.

COV19-CT-DB ships its scans as 8-bit JPEG slices; DICOM and NIfTI scans hold HU and the synthetic
phantoms are rendered in HU. A model trained on COV19-CT-DB only works on the others if they reach
it with the grey levels of COV19-CT-DB, so all of them go through one linear window,
``COV19_CT_DB_WINDOW`` (``Window.to_uint8``: ``level - width / 2`` -> 0, ``level + width / 2`` ->
255, rounded and clipped). Its numbers come from the measurement below; ``docs/intensities.md``
describes it in full.

**What COV19-CT-DB looks like** (``COV19_CT_DB_BANDS``, measured on real 512x512 slices of the
dataset, covid and non-covid): air outside the body at grey level ~30 (25-35), the soft-tissue
peak at ~195 (189-200), and the fractions of pixels in the grey bands ``< 40 / 40-99 / 100-159 /
160-219 / >= 220`` (``BAND_EDGES``) about 0.32 / 0.26 / 0.07 / 0.24 / 0.11.

**The fit.** On a real chest CT series (``../shared/data/real-ct/``: TCIA Lung-PET-CT-Dx
A0002, 30 slices of 512x512, 8 mm), level and width were searched on a grid (level -700..-300 HU,
width 1000..2000 HU, steps of 5 and 10 HU) for the smallest L1 distance between the band fractions
of the series' middle half (slices from 1/4 to 3/4 of the depth, native resolution) and
``COV19_CT_DB_BANDS``; ``scripts/intensity_bands.py --fit`` repeats it. The minimum, level -470 HU
and width 1410 HU, gives an L1 distance of 0.084 (the former window: 0.80) and puts air (-1000 HU)
at grey level 31.6, inside COV19-CT-DB's 25-35; +40 HU lands at 220 and the series' fat peak
(-110 HU) at 188, next to COV19-CT-DB's soft-tissue peak (~195).

The former lung window (level -600, width 1500: ``LEGACY_LUNG_WINDOW``) put air at ~60 and soft
tissue at ~236 and is kept only for comparisons.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cov3d.window import MAX_GREY, Window

__all__ = [
    "BAND_EDGES",
    "COV19_CT_DB_BANDS",
    "HEALTHY_LUNG_HU",
    "LEGACY_LUNG_WINDOW",
    "band_distance",
    "band_fractions",
    "middle_half",
]

LEGACY_LUNG_WINDOW = Window(level=-600.0, width=1500.0)
"""cov3d's mapping before the calibration (air ~60, soft tissue ~236): for comparisons only."""
HEALTHY_LUNG_HU = -850.0
"""Typical aerated lung parenchyma (e.g. Radiopaedia, "Hounsfield unit"): the phantoms' lungs and
the grey ``cov3d explain --method occlusion`` puts in place of each block."""

BAND_EDGES = (40, 100, 160, 220)
"""Grey-level band edges: bands < 40, 40-99, 100-159, 160-219, >= 220."""
COV19_CT_DB_BANDS = (0.32, 0.26, 0.07, 0.24, 0.11)
"""Fractions of COV19-CT-DB pixels in those bands (measured on real slices of the dataset)."""
COV19_CT_DB_AIR_GREY, COV19_CT_DB_SOFT_TISSUE_GREY = 30, 195
"""Grey levels of air outside the body (25-35) and of the soft-tissue peak (189-200) in COV19-CT-DB."""


def band_fractions(grey: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """Fractions (5,) of the pixels of 8-bit images (one array, or an iterable of slices) in the bands."""
    arrays = [grey] if isinstance(grey, np.ndarray) else list(grey)
    counts = np.zeros(MAX_GREY + 1, dtype=np.int64)
    for array in arrays:
        counts += np.bincount(np.asarray(array, dtype=np.uint8).ravel(), minlength=MAX_GREY + 1)
    total = counts.sum()
    if total == 0:
        raise ValueError("no pixels to measure")
    edges = (0, *BAND_EDGES, MAX_GREY + 1)
    return np.array([counts[a:b].sum() for a, b in zip(edges[:-1], edges[1:])]) / total


def band_distance(fractions: Iterable[float], reference: Iterable[float] = COV19_CT_DB_BANDS) -> float:
    """L1 distance between two band-fraction vectors (0: same; at most 2)."""
    return float(np.abs(np.asarray(list(fractions), dtype=np.float64) - np.asarray(list(reference))).sum())


def middle_half(count: int) -> range:
    """Indices of the middle half of ``count`` slices (from 1/4 to 3/4 of the depth; all of 1-3)."""
    start = count // 4
    return range(start, max(count - start, start + 1))
