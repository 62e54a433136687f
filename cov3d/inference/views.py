"""`cov3d show`: the axial, sagittal and coronal mid-planes of scans, one row per scan (paper Fig. 2).

A scan is a folder of JPEG slices, a DICOM series folder, a NIfTI file (HU through the intensity
window: ``--window``, else the model's, else ``DEFAULT_WINDOW``) or a cached tensor file
(``cov3d.preprocessing.cache`` entries, or a plain tensor ``(1, D, H, W)`` / ``(D, H, W)`` in [0, 1]).
A scan is shown at ``DISPLAY_SIZE``, or, given a ``VolumeShape``, as preprocessed to it (from the
cache, as training reads it). Each row is titled with the scan's name and,
when the scan lies in the dataset layout ``<partition>/<covid|non-covid>/<scan>``, its label and
the severity from the partition's CSV; with a run folder, also the model's prediction; and the
scan's flags (``cov3d.inference.flags``), if it has any.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cov3d.dataset.dicom_nifti import grey_slices, scan_sources
from cov3d.dataset.domain import ScanMeasure
from cov3d.dataset.layout import PRESENCE_FOLDERS, SEVERITY_CATEGORIES, SEVERITY_CSVS, read_severity_csv
from cov3d.dataset.scans import find_scans, is_nifti_file
from cov3d.errors import Cov3dError, one_line
from cov3d.inference.flags import DomainChecks, flags_title
from cov3d.preprocessing.cache import LEVELS, STORAGE_DTYPE, from_levels
from cov3d.preprocessing.preprocess import preprocess_scan
from cov3d.settings import VolumeShape
from cov3d.viz.figures import save_figure, slice_views
from cov3d.window import DEFAULT_WINDOW, MODEL_WINDOW, ModelWindow, Window

DISPLAY_SIZE = 256
"""In-plane pixels (H = W) a JPEG scan is resized to for display; its depth is kept up to this too."""
MAX_SCANS = 16
"""Most rows in one figure."""
TENSOR_SUFFIXES = (".pt", ".pth")


@dataclass
class ViewedScan:
    """A scan ready to draw: its name, volume (D, H, W) float32 in [0, 1], where it came from and
    its domain measures (``cov3d.dataset.domain``; ``None`` for a tensor file)."""

    name: str
    volume: np.ndarray
    source: Path | None
    domain: dict | None = None


def load_tensor_file(path: Path) -> tuple[torch.Tensor, Path | None]:
    """A cached or plain tensor file -> (volume (D, H, W) float32, source scan folder if recorded).

    uint8 volumes (cache entries) are levels and are divided by 255 (``cov3d.preprocessing.cache``)."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for foreign files
        raise Cov3dError(f"Cannot read tensor file {path}: {one_line(error)[:120]}. "
                         "Give a cov3d cache file or a tensor saved with torch.save.") from None
    source = Path(entry["source"]) if isinstance(entry, dict) and isinstance(entry.get("source"), str) else None
    volume = entry.get("volume") if isinstance(entry, dict) else entry
    if not isinstance(volume, torch.Tensor) or volume.dim() not in (3, 4) or (volume.dim() == 4 and volume.shape[0] != 1):
        raise Cov3dError(f"{path} holds no volume (1, D, H, W) or (D, H, W): give a cov3d cache file.")
    volume = volume.reshape(volume.shape[-3:])
    return (from_levels(volume) if volume.dtype == STORAGE_DTYPE else volume.float()), source


def is_tensor_file(path: Path) -> bool:
    """Whether ``path`` is a tensor file (not a scan folder or NIfTI file)."""
    return Path(path).is_file() and not is_nifti_file(Path(path))


def slice_count(path: Path) -> int:
    """The number of slices of a scan folder or NIfTI file."""
    sources = scan_sources(path)
    return grey_slices(sources.kind, sources.files)[0] if sources.kind == "nifti" else len(sources.files)


def load_view(path: Path, size: int = DISPLAY_SIZE, *, shape: VolumeShape | None = None,
              cache_dir: Path | None = None, window: Window = DEFAULT_WINDOW) -> ViewedScan:
    """Read a tensor file, or a scan (JPEG or DICOM folder, NIfTI file; HU through ``window``):
    resized to ``size`` x ``size`` with at most ``size`` slices, or with ``shape`` the cached volume
    of that shape (and its window) in ``cache_dir``."""
    path = Path(path)
    if is_tensor_file(path):
        volume, source = load_tensor_file(path)
        name = source.name if source is not None else path.stem
        return ViewedScan(name, volume.numpy(), source)
    if shape is not None:
        from cov3d.preprocessing.preprocess import VolumeCache

        levels, domain = VolumeCache(cache_dir, shape).levels_and_domain(path)
        volume = from_levels(levels)[0]
    else:
        depth = min(slice_count(path), size)
        measure = ScanMeasure()
        volume = preprocess_scan(path, depth, size, size, window=window, measure=measure)[0]
        domain = measure.result()
    name = path.name.removesuffix(".gz").removesuffix(".nii") if is_nifti_file(path) else path.name
    return ViewedScan(name, volume.numpy(), path, domain)


@functools.lru_cache(maxsize=16)
def _severities(csv_path: Path) -> dict[str, int]:
    """The severity CSV of a partition, read once per figure."""
    return read_severity_csv(csv_path) if csv_path.is_file() else {}


def layout_label(scan_dir: Path | None) -> str | None:
    """'covid, moderate (train)', 'non-covid (validation)' or 'covid (train)' (not annotated) for a
    scan in ``<data>/<partition>/<covid|non-covid>/``; ``None`` elsewhere."""
    if scan_dir is None:
        return None
    label_dir = scan_dir.parent
    partition = label_dir.parent.name
    if label_dir.name not in PRESENCE_FOLDERS or partition not in SEVERITY_CSVS:
        return None
    label = label_dir.name
    if PRESENCE_FOLDERS[label]:
        severity = _severities(label_dir.parent.parent / SEVERITY_CSVS[partition]).get(scan_dir.name)
        if severity:
            label += f", {SEVERITY_CATEGORIES[severity]}"
    return f"{label} ({partition})"


def expand_paths(paths: Sequence[Path]) -> list[Path]:
    """Tensor and NIfTI files as given; folders expanded to the scans (JPEG and DICOM folders,
    NIfTI files) at or below them."""
    expanded: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            if path.suffix not in TENSOR_SUFFIXES and not is_nifti_file(path):
                raise Cov3dError(
                    f"{path} is not a scan: give a folder of <integer>.jpg slices, a DICOM series folder, "
                    "a NIfTI file (.nii, .nii.gz) or a .pt tensor file."
                )
            expanded.append(path)
        else:
            expanded += find_scans([path])
    if len(expanded) > MAX_SCANS:
        raise Cov3dError(f"{len(expanded)} scans given: a figure shows at most {MAX_SCANS}; give fewer.")
    return expanded


def as_levels(volume: torch.Tensor) -> torch.Tensor:
    """A volume in [0, 1] as the cache's uint8 levels round(255 v), same shape."""
    return volume.mul(LEVELS).round_().clamp_(0, LEVELS).to(STORAGE_DTYPE)


def model_volume(path: Path, shape: VolumeShape, cache_dir: Path, volume: torch.Tensor | None = None) -> torch.Tensor:
    """The (1, D, H, W) input a run of ``shape`` expects: from the cache for a scan (folder or NIfTI
    file; HU through the shape's window); for a tensor file its volume (D, H, W) (``volume`` if
    already read, else read from ``path``), resampled trilinearly and clipped to [0, 1]."""
    from cov3d.preprocessing.preprocess import VolumeCache

    if not is_tensor_file(path):
        return VolumeCache(cache_dir, shape).get(path)
    if volume is None:
        volume = load_tensor_file(path)[0]
    return F.interpolate(volume[None, None], size=shape.dims, mode="trilinear", align_corners=False)[0].clamp(0, 1)


def show_scans(
    paths: Sequence[Path],
    output: Path,
    *,
    run_dir: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    shape: VolumeShape | None = None,
    window: Window | ModelWindow = MODEL_WINDOW,
) -> list[str]:
    """Write the mid-plane figure of ``paths`` to ``output``; returns the row titles.

    ``output`` may replace an earlier cov3d figure, or with ``overwrite`` any file, but never an
    input (``cov3d.outputs.check_figure``). ``shape``: show scans as preprocessed to it (see the
    module docstring). DICOM and NIfTI scans go through ``window``; ``MODEL_WINDOW``: the model's
    (with ``run_dir``), else ``DEFAULT_WINDOW``.
    """
    from cov3d.locks import writing
    from cov3d.outputs import check_figure
    from cov3d.preprocessing.preprocess import default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    scan_paths = expand_paths(paths)
    check_figure(output, overwrite=overwrite, inputs=[*scan_paths, *([run_dir] if run_dir is not None else [])])
    titles = []
    predictor = None
    if run_dir is not None:
        from cov3d.model.files import load_source
        from cov3d.model.predictor import RunPredictor
        from cov3d.runtime import resolve_device, resolve_precision

        torch_device = resolve_device(device)
        predictor = RunPredictor(load_source(run_dir), torch_device, resolve_precision(precision, torch_device),
                                 window=window)
        window = predictor.shape.window
    elif window is MODEL_WINDOW:
        window = DEFAULT_WINDOW
    shown = shape.with_window(window) if shape is not None else None
    views = [load_view(path, shape=shown, cache_dir=cache_dir, window=window) for path in scan_paths]
    checks = DomainChecks([] if predictor is None else [(predictor.source, predictor.shape)])
    for path, view in zip(scan_paths, views):
        parts = [view.name]
        label = layout_label(view.source)
        if label:
            parts.append(label)
        volume = None
        if predictor is not None:
            volume = model_volume(path, predictor.shape, cache_dir, torch.from_numpy(view.volume))[None]
        flags = checks.flags(view.domain, None if volume is None else {predictor.shape: as_levels(volume[0])})
        if flags:
            parts.append(flags_title(flags))
        if predictor is not None:
            prediction = predictor.predict(volume)[0]
            if not prediction.finite:
                parts.append("no prediction (the model's output is not finite)")
                titles.append("  |  ".join(parts))
                continue
            guess = "covid" if prediction.covid else "non-covid"
            if prediction.covid and prediction.severity:
                guess += f", {prediction.severity}"
            parts.append(f"predicted {guess} (p = {prediction.covid_probability:.2f})")
        titles.append("  |  ".join(parts))
    figure = slice_views([view.volume for view in views], titles)
    with writing(output, brief=True):
        save_figure(figure, output)
    return titles

