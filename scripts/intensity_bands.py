"""Print how far the grey levels of scans are from COV19-CT-DB's (``cov3d.dataset.intensity``).

For every scan found under the given paths (JPEG slice folders, DICOM series folders, NIfTI
files; HU through ``--window``, default the calibrated ``DEFAULT_WINDOW``), the middle half of
its slices (from 1/4 to 3/4 of the depth, at their own resolution) is sorted into the grey bands
< 40 / 40-99 / 100-159 / 160-219 / >= 220. The script prints each scan's band fractions with
``--per-scan``, and the mean over scans (each scan weighs the same), the L1 distance of that mean
to COV19-CT-DB's fractions, and the mean grey level of air (the mode below 100) and of the
soft-tissue peak (the mode of 150-250).

``--fit`` (DICOM and NIfTI only) searches level and width on a grid for the smallest distance, as
the calibration did (docs/intensities.md).

    python3 scripts/intensity_bands.py ../shared/data/real-ct/
    python3 scripts/intensity_bands.py demo-output/data --limit 40
    python3 scripts/intensity_bands.py ../shared/data/real-ct/ --fit
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cov3d.dataset.dicom_nifti import grey_slices, scan_sources
from cov3d.dataset.intensity import (
    BAND_EDGES,
    COV19_CT_DB_AIR_GREY,
    COV19_CT_DB_BANDS,
    COV19_CT_DB_SOFT_TISSUE_GREY,
    band_distance,
    band_fractions,
    middle_half,
)
from cov3d.dataset.scans import find_scans, read_slice
from cov3d.window import DEFAULT_WINDOW, Window

AIR_RANGE, SOFT_TISSUE_RANGE = (0, 100), (150, 251)
"""Grey ranges in which the air and soft-tissue peaks are looked for."""


def middle_slices(scan: Path, window: Window) -> list[np.ndarray]:
    """The 8-bit slices of the middle half of a scan (HU through ``window``)."""
    sources = scan_sources(scan)
    if sources.kind == "jpeg":
        keep = middle_half(len(sources.files))
        return [np.asarray(read_slice(sources.files[i])) for i in keep]
    count, slices = grey_slices(sources.kind, sources.files, window)
    keep = set(middle_half(count))
    return [grey for i, grey in enumerate(slices) if i in keep]


def peak(grey: list[np.ndarray], span: tuple[int, int]) -> int:
    """The most frequent grey level within ``span`` (histogram smoothed over 5 levels)."""
    counts = sum(np.bincount(g.ravel(), minlength=256) for g in grey).astype(np.float64)
    smooth = np.convolve(counts, np.ones(5) / 5, mode="same")
    return int(span[0] + np.argmax(smooth[span[0]:span[1]]))


def middle_hu(scan: Path) -> np.ndarray:
    """HU of the middle half of a DICOM or NIfTI scan, through an identity-like wide mapping."""
    sources = scan_sources(scan)
    if sources.kind == "jpeg":
        raise SystemExit(f"--fit needs DICOM or NIfTI scans (HU); {scan} is a JPEG folder.")
    if sources.kind == "dicom":
        import pydicom

        files = [sources.files[i] for i in middle_half(len(sources.files))]
        arrays = []
        for path in files:
            data = pydicom.dcmread(path)
            slope, intercept = float(getattr(data, "RescaleSlope", 1) or 1), float(getattr(data, "RescaleIntercept", 0) or 0)
            arrays.append(data.pixel_array.astype(np.float32) * slope + intercept)
        return np.stack(arrays)
    import nibabel

    volume = np.asanyarray(nibabel.load(str(sources.files[0])).dataobj, dtype=np.float32)
    return volume[..., list(middle_half(volume.shape[-1]))]


def fit(scans: list[Path]) -> None:
    """Grid search of level and width for the smallest band distance over ``scans`` (mean over
    scans). Works on each scan's histogram of HU rounded to integers, so a window costs a few
    thousand operations, not a pass over the voxels."""
    histograms = []
    for scan in scans:
        hu = np.rint(middle_hu(scan)).astype(np.int64).ravel()
        values, counts = np.unique(hu, return_counts=True)
        histograms.append((values.astype(np.float32), counts))
    results = []
    for level in range(-700, -295, 5):
        for width in range(1000, 2001, 10):
            window = Window(level, width)
            mean = np.mean([
                np.bincount(np.searchsorted(BAND_EDGES, window.to_uint8(values), side="right"), weights=counts,
                            minlength=len(BAND_EDGES) + 1) / counts.sum()
                for values, counts in histograms
            ], axis=0)
            results.append((band_distance(mean), level, width))
    results.sort()
    print("best windows (L1 distance, level, width, grey of -1000 HU, grey of +40 HU):")
    for distance, level, width in results[:10]:
        window = Window(level, width)
        print(f"  {distance:.3f}  {level:5d} {width:5d}  {window.grey(-1000):5.1f} {window.grey(40):5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="Dataset folders, scan folders, DICOM folders or NIfTI files.")
    parser.add_argument("--window", default=str(DEFAULT_WINDOW), help="LEVEL,WIDTH in HU for DICOM and NIfTI (default: %(default)s).")
    parser.add_argument("--limit", type=int, default=0, help="Measure at most this many scans (evenly picked); 0: all.")
    parser.add_argument("--per-scan", action="store_true", help="Also print every scan's fractions.")
    parser.add_argument("--fit", action="store_true", help="Search the window that minimises the distance (DICOM/NIfTI).")
    args = parser.parse_args()

    scans = find_scans(args.paths)
    if args.limit and len(scans) > args.limit:
        scans = [scans[i] for i in np.linspace(0, len(scans) - 1, args.limit).round().astype(int)]
    if not scans:
        raise SystemExit("No scans found.")
    if args.fit:
        fit(scans)
        return
    window = Window.parse(args.window)
    fractions, air, tissue = [], [], []
    for scan in scans:
        grey = middle_slices(scan, window)
        fractions.append(band_fractions(grey))
        air.append(peak(grey, AIR_RANGE))
        tissue.append(peak(grey, SOFT_TISSUE_RANGE))
        if args.per_scan:
            print(f"{scan}: {' / '.join(f'{f:.2f}' for f in fractions[-1])}  L1 {band_distance(fractions[-1]):.3f}")
    mean = np.mean(fractions, axis=0)
    print(f"{len(scans)} scans, middle halves; window {window} for DICOM/NIfTI")
    print(f"bands <40 / 40-99 / 100-159 / 160-219 / >=220: {' / '.join(f'{f:.3f}' for f in mean)}")
    print(f"COV19-CT-DB:                                   {' / '.join(f'{f:.3f}' for f in COV19_CT_DB_BANDS)}")
    print(f"L1 distance to COV19-CT-DB: {band_distance(mean):.3f}")
    print(f"air peak {np.mean(air):.0f} (COV19-CT-DB ~{COV19_CT_DB_AIR_GREY}), "
          f"soft-tissue peak {np.mean(tissue):.0f} (COV19-CT-DB ~{COV19_CT_DB_SOFT_TISSUE_GREY})")


if __name__ == "__main__":
    main()
