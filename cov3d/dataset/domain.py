"""Is a scan a chest CT at all? Measures taken once per scan while its slices are read, and the
flags they raise (docs/inference.md#flags).

``ScanMeasure`` sees every slice as it is read (``cov3d.dataset.dicom_nifti.grey_slices`` and the
JPEG path of ``cov3d.preprocessing.preprocess``), on a grid of at most about ``MEASURE_GRID``
pixels a side, and keeps a few counts; ``ScanMeasure.result`` turns them into a small JSON-able
dict that the cache stores beside the volume, and ``scan_flags`` reads the flags from that dict.

The thresholds come from the physics of CT numbers, not from fitting files: air is -1000 HU and
water 0 HU by definition of the scale, so a CT in HU has air near -1000 HU around the body and
in the airways (``not-ct`` when it has none); aerated lung is a mix of air and tissue, -950 to
-300 HU, and an adult's lungs hold litres of it in large solid regions (``no-lungs`` below
``MIN_LUNG_LITRES``).
JPEG slices carry no HU, no modality and no voxel size: only the grey-level version of ``no-lungs``
(a share of the body, ``MIN_LUNG_SHARE``) applies to them. A NIfTI volume must hold HU: one that does
not (MR, or grey levels) is ``not-ct``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cov3d.window import COV19_CT_DB_WINDOW

FLAG_NOT_CT = "not-ct"
FLAG_NO_LUNGS = "no-lungs"
FLAG_SYNTHETIC_MODEL = "synthetic-model"
FLAG_OUT_OF_DISTRIBUTION = "out-of-distribution"
FLAGS = (FLAG_NOT_CT, FLAG_NO_LUNGS, FLAG_SYNTHETIC_MODEL, FLAG_OUT_OF_DISTRIBUTION)
"""Every flag code, in the order a CSV cell lists them."""
FLAG_SEPARATOR = ";"

AIR_HU, WATER_HU = -1000.0, 0.0
"""The two fixed points of the Hounsfield scale."""
AIR_BAND_HU = (-1100.0, -900.0)
"""Air, allowing for noise and partial volume (image noise of a CT is about 10-50 HU)."""
BODY_HU = (AIR_HU + WATER_HU) / 2
"""The body's edge: voxels above -500 HU are mostly tissue, below mostly air."""
LUNG_BAND_HU = (-950.0, -300.0)
"""Lung that holds air: from emphysema (-950 HU, 95 % air) through healthy parenchyma (about
-850 HU) to ground glass (-700 to -300 HU, at least 30 % air), so that a lung mostly turned to
ground glass by COVID-19 still counts. Fat (-100 HU) and soft tissue are above it."""
MIN_AIR_SHARE = 0.005
"""A CT in HU has at least this share of its voxels in ``AIR_BAND_HU``: the air around the body and
in the airways fills tens of percent of a CT's field of view; even a field of view cut to the
body keeps the trachea and the darker half of the lungs. MR and other images hold none."""
MIN_LUNG_LITRES = 0.5
"""Least aerated lung inside the body of a scan that covers the lungs. An adult's lungs hold about
1.2 L of air at residual volume, i.e. some 1.5 L of tissue at -950 to -300 HU; 0.5 L leaves room for
two thirds of it consolidated by disease or cut off by the field of view. An abdomen CT holds about
0.2 L at -950 to -600 HU (bowel gas edges, the lung bases), a chest CT 2.5-4.5 L."""
ADULT_TRUNK_LITRES = 25.0
"""Body volume of an adult trunk from the neck to the pelvis (about 40 % of a 60-70 kg body)."""
MIN_LUNG_SHARE = MIN_LUNG_LITRES / ADULT_TRUNK_LITRES
"""``MIN_LUNG_LITRES`` as a share of the body, for scans without voxel sizes (JPEG): 2 %, what the
least lungs would fill of the largest body a scan can show."""
MIN_LUNG_REGION_SHARE = 0.02
"""Lung-density voxels count only in connected regions of at least this share of the slice's body: a
lung's cross-section is a solid region of tens to hundreds of cm^2 (several percent of the body's)
wherever the lungs are more than a sliver, while the partial-volume rims of bowel gas are thin rings
and the gas mottling stool is in small specks (a 5 cm gas-filled loop's rim is about 1 % of an
abdomen's cross-section)."""
MEASURE_GRID = 128
"""Slices are measured on every k-th pixel, k chosen so that about this many remain a side; of a scan
of more slices than this, every k-th slice likewise (a thin-slice series needs no finer sampling)."""
GREY_BODY = COV19_CT_DB_WINDOW.grey(BODY_HU)
GREY_LUNG_BAND = tuple(COV19_CT_DB_WINDOW.grey(hu) for hu in LUNG_BAND_HU)
"""``BODY_HU`` and ``LUNG_BAND_HU`` in grey levels, through the mapping calibrated to COV19-CT-DB's
slices (``cov3d.window``): the grey-level version of the checks for JPEG slices."""


def _body(tissue: np.ndarray) -> np.ndarray:
    """The body in a slice: the largest connected region of ``tissue`` (H, W) bool, its holes (the
    lungs, the airways: background regions that do not reach the slice's edge) filled. Arms, the
    table and clothes are left out."""
    labels, count = ndimage.label(tissue)
    if count == 0:
        return tissue
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(sizes.argmax())
    outside, _ = ndimage.label(~largest)
    edge = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
    return largest | ((outside > 0) & ~np.isin(outside, edge))


def _lung(body: np.ndarray, density: np.ndarray) -> np.ndarray:
    """The voxels of lung density (``density``, (H, W) bool) inside the ``body`` (without its edge,
    ``_inner``) that lie in regions of at least ``MIN_LUNG_REGION_SHARE`` of the body."""
    candidates = _inner(body) & density
    labels, count = ndimage.label(candidates)
    if count == 0:
        return candidates
    sizes = np.bincount(labels.ravel())
    large = sizes >= MIN_LUNG_REGION_SHARE * np.count_nonzero(body)
    large[0] = False
    return large[labels]


def _inner(body: np.ndarray) -> np.ndarray:
    """The body without its outermost pixel (4-neighbour erosion): the skin's partial-volume edge,
    between air and tissue, would otherwise count as lung density."""
    inner = np.zeros_like(body)
    inner[1:-1, 1:-1] = (body[1:-1, 1:-1] & body[:-2, 1:-1] & body[2:, 1:-1] & body[1:-1, :-2] & body[1:-1, 2:])
    return inner


class ScanMeasure:
    """Counts over the slices of one scan, fed as they are read: ``add_hu`` for CT numbers (DICOM,
    NIfTI in HU), ``add_grey`` for 8-bit grey levels (JPEG). The reader also notes what it knows:
    ``modality`` (DICOM), ``values`` ("hu", "grey", or the range of values that are not HU, set
    instead of the slices), and the voxel size (``voxel_mm3`` of the full grid, or ``note_dicom_geometry``)."""

    def __init__(self) -> None:
        self.modality: str | None = None
        self.values: str | None = None
        self.voxel_mm3: float | None = None
        self.voxels = self.air = self.body = self.lung = 0
        self.measured_pixels_per_voxel = 1
        self.slice_step, self._seen = 1, 0
        self._positions: list[np.ndarray] = []
        self._pixel_mm2: float | None = None
        self._thickness: float | None = None

    def expect(self, slices: int) -> None:
        """Measure every k-th of the scan's ``slices`` slices, so that about ``MEASURE_GRID`` are measured."""
        self.slice_step = max(1, slices // MEASURE_GRID)

    def _skips(self) -> bool:
        """Whether the slice now given is left out (see ``expect``)."""
        self._seen += 1
        return (self._seen - 1) % self.slice_step != 0

    @staticmethod
    def _grid(image: np.ndarray) -> tuple[np.ndarray, int]:
        step = max(1, min(image.shape) // MEASURE_GRID)
        return image[::step, ::step], step * step

    def _count(self, sample: np.ndarray, body: np.ndarray, lung: np.ndarray, air: np.ndarray, weight: int) -> None:
        self.measured_pixels_per_voxel = weight
        self.voxels += sample.size
        self.air += int(np.count_nonzero(air))
        self.body += int(np.count_nonzero(body))
        self.lung += int(np.count_nonzero(lung))

    def add_hu(self, hu: np.ndarray) -> None:
        """One slice (H, W) of CT numbers."""
        self.values = self.values or "hu"
        if self._skips():
            return
        sample, weight = self._grid(hu)
        body = _body(sample > BODY_HU)
        lung = _lung(body, (sample >= LUNG_BAND_HU[0]) & (sample <= LUNG_BAND_HU[1]))
        self._count(sample, body, lung, (sample >= AIR_BAND_HU[0]) & (sample <= AIR_BAND_HU[1]), weight)

    def add_grey(self, grey: np.ndarray) -> None:
        """One slice (H, W) of 8-bit grey levels, measured as ``add_hu`` through COV19-CT-DB's mapping
        (``GREY_BODY``, ``GREY_LUNG_BAND``); air is what is darker than the body."""
        self.values = self.values or "grey"
        if self._skips():
            return
        sample, weight = self._grid(np.asarray(grey))
        body = _body(sample > GREY_BODY)
        lung = _lung(body, (sample >= GREY_LUNG_BAND[0]) & (sample <= GREY_LUNG_BAND[1]))
        self._count(sample, body, lung, sample <= GREY_BODY, weight)

    def note_dicom_geometry(self, dataset: Any) -> None:
        """Modality, pixel spacing, position and thickness of one DICOM slice (a pydicom dataset)."""
        modality = str(getattr(dataset, "Modality", "") or "").strip().upper()
        self.modality = modality or self.modality
        try:
            rows_mm, columns_mm = (float(value) for value in dataset.PixelSpacing)
            self._pixel_mm2 = self._pixel_mm2 or rows_mm * columns_mm
        except (AttributeError, TypeError, ValueError):
            pass
        try:
            self._positions.append(np.asarray(dataset.ImagePositionPatient, dtype=np.float64))
        except (AttributeError, TypeError, ValueError):
            pass
        try:
            self._thickness = self._thickness or float(dataset.SliceThickness)
        except (AttributeError, TypeError, ValueError):
            pass

    def _dicom_voxel_mm3(self) -> float | None:
        """Pixel area times the median distance between consecutive slices (or the thickness)."""
        if self._pixel_mm2 is None:
            return None
        positions = [p for p in self._positions if p.shape == (3,)]
        steps = np.linalg.norm(np.diff(np.array(positions), axis=0), axis=1) if len(positions) > 1 else np.array([])
        spacing = float(np.median(steps)) if steps.size else self._thickness
        return self._pixel_mm2 * spacing if spacing and math.isfinite(spacing) and spacing > 0 else None

    def result(self) -> dict[str, Any]:
        """The measures: ``values``, ``modality``, ``air_share`` (of all voxels), ``lung_share`` (of
        the body), ``lung_litres`` (``None`` without voxel sizes or HU)."""
        voxel_mm3 = self.voxel_mm3 if self.voxel_mm3 is not None else self._dicom_voxel_mm3()
        litres = None
        if self.values == "hu" and voxel_mm3 is not None:
            litres = self.lung * self.measured_pixels_per_voxel * self.slice_step * voxel_mm3 / 1e6
        return {
            "values": self.values,
            "modality": self.modality,
            "air_share": self.air / self.voxels if self.voxels else None,
            "lung_share": self.lung / self.body if self.body else 0.0,
            "lung_litres": litres,
        }


def scan_flags(measures: dict[str, Any] | None) -> dict[str, str]:
    """``{flag: reason}`` of ``not-ct`` and ``no-lungs`` from ``ScanMeasure.result``; empty for
    ``None`` (nothing measured, e.g. a tensor file)."""
    if not measures:
        return {}
    modality, values = measures.get("modality"), measures.get("values")
    if modality and modality != "CT":
        return {FLAG_NOT_CT: f"its DICOM modality is {modality}, not CT"}
    if values not in ("hu", "grey"):
        return {FLAG_NOT_CT: f"its values run {values}, not HU (no air near -1000 HU): not a CT in HU "
                             "(MR, or grey levels that cannot be checked)"}
    if values == "hu":
        air = measures.get("air_share") or 0.0
        if air < MIN_AIR_SHARE:
            return {FLAG_NOT_CT: f"only {air:.2%} of its voxels are air near -1000 HU, "
                                 f"a CT has at least {MIN_AIR_SHARE:.1%}"}
        litres = measures.get("lung_litres")
        if litres is not None:
            if litres < MIN_LUNG_LITRES:
                return {FLAG_NO_LUNGS: f"{litres:.2f} L of lung ({LUNG_BAND_HU[0]:g} to {LUNG_BAND_HU[1]:g} HU) in the body, "
                                       f"a chest CT holds at least {MIN_LUNG_LITRES} L"}
            return {}
    share = measures.get("lung_share") or 0.0
    if share < MIN_LUNG_SHARE:
        return {FLAG_NO_LUNGS: f"{share:.1%} of the body has lung density, a chest CT has at least {MIN_LUNG_SHARE:.0%}"}
    return {}


def flags_cell(flags: Sequence[str]) -> str:
    """The CSV cell of a scan's flags: the codes in ``FLAGS`` order joined by ``;`` (empty: none)."""
    return FLAG_SEPARATOR.join(code for code in FLAGS if code in flags)
