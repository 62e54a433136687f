"""Synthetic chest-CT datasets in the COV19-CT-DB layout, for ``cov3d demo`` and the tests.

``generate_dataset`` writes train/, validation/ and test/ scan folders of numbered JPEG slices, the two
severity CSVs, the test answer key (``test_labels.csv``), a marker that the data are synthetic
(``SYNTHETIC_MARKER``, recorded by ``cov3d train``) and, with ``masks``, each scan's lesion and lung
masks under ``lesion-masks/`` (``read_masks``). Like the real data, scan numbers restart per folder, a few
names lack the underscore, depths are bimodal and a few scans mix slice sizes; slices are rendered in HU
(``cov3d.synthetic.phantom``) and mapped with ``DEFAULT_WINDOW``. Each scan has its own child seed, so a
seed always gives the same bytes (docs/demo.md).
"""

import csv
import json
import math
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d import __version__
from cov3d.dataset.layout import (
    ANSWER_KEY,
    CSV_DELIMITER,
    PARTITIONS,
    PRESENCE_FOLDERS,
    SEVERITY_CSVS,
    SEVERITY_LABELS,
    SYNTHETIC_MARKER,
)
from cov3d.dataset.scans import scan_number
from cov3d.errors import Cov3dError
from cov3d.limits import DEPTH_SCALE, FRACTION, OPTIONAL_COUNT, SEED, SLICE_SIZE, SYNTHETIC_SCANS, WORKERS
from cov3d.settings import SYNTHETIC_DEFAULTS
from cov3d.synthetic.phantom import render_phantom
from cov3d.window import DEFAULT_WINDOW

CLASS_FOLDERS = {bool(code): name for name, code in reversed(PRESENCE_FOLDERS.items())}  # covid first
TEST_FOLDER = "test"
TEST_LABELS_CSV = ANSWER_KEY.format(partition=TEST_FOLDER)
MASKS_FOLDER = "lesion-masks"
MASK_SUFFIX = ".npz"

VALIDATION_SHARE = 0.2  # train/validation/test roughly 60/20/20
TEST_SHARE = 0.2
COVID_SHARE = 0.5
NO_UNDERSCORE_SHARE = 0.05  # names spelt ``ct_scan7`` as some real folders are
JPEG_QUALITY = 92

# Depth (slice count) mixture, fitted by eye to the paper's Figure 1: > 58 % of scans under 160 slices,
# ~99 % under 500, range 1..1201. Components: (weight, median slices, log-sd); the first is a log-uniform
# tail of very short scans.
SHORT_DEPTH_WEIGHT, SHORT_DEPTH_MAX = 0.02, 30
DEPTH_LOGNORMALS = ((0.585, 60.0, 0.35), (0.39, 330.0, 0.2), (0.005, 750.0, 0.2))
MIN_DEPTH, MAX_DEPTH = 1, 1201
FORCED_SHORT_DEPTHS = (1, 2)  # every dataset keeps a couple of very short scans
MIXED_SIZE_FACTORS = (0.75, 1.25)  # other slice size in mixed-size scans, relative to slice_size


@dataclass
class SyntheticSummary:
    """What :func:`generate_dataset` wrote: scan counts per partition and class, annotated severity
    counts per partition, the depths drawn and the scans with mixed slice sizes (relative paths)."""

    out_dir: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    annotated: dict[str, dict[str, int]] = field(default_factory=dict)
    depths: list[int] = field(default_factory=list)
    mixed_size_scans: list[str] = field(default_factory=list)

    @property
    def total_scans(self) -> int:
        """Number of scans written, all partitions together."""
        return sum(sum(by_class.values()) for by_class in self.counts.values())


@dataclass
class _ScanPlan:
    """One scan to render: where it goes, its labels and its acquisition."""

    folder: Path
    has_covid: bool
    severity: int
    annotated: bool
    depth: int
    seed: np.random.SeedSequence
    mixed_size: int | None = None


def sample_depths(rng: np.random.Generator, n: int, depth_scale: float = 1.0) -> np.ndarray:
    """Draw ``n`` slice counts from the bimodal mixture, scaled by ``depth_scale``; int64 (n,), >= 1."""
    weights = np.array([SHORT_DEPTH_WEIGHT] + [w for w, _, _ in DEPTH_LOGNORMALS])
    component = rng.choice(len(weights), size=n, p=weights / weights.sum())
    medians = np.array([1.0] + [m for _, m, _ in DEPTH_LOGNORMALS])
    sigmas = np.array([1.0] + [s for _, _, s in DEPTH_LOGNORMALS])
    raw = medians[component] * np.exp(sigmas[component] * rng.standard_normal(n))
    short = np.exp(rng.uniform(0.0, np.log(SHORT_DEPTH_MAX), size=n))
    raw = np.where(component == 0, short, raw)
    depths = np.clip(np.rint(raw), MIN_DEPTH, MAX_DEPTH) * depth_scale
    return np.maximum(np.rint(depths), MIN_DEPTH).astype(np.int64)


def render_scan(
    rng: np.random.Generator, *, depth: int, slice_size: int, has_covid: bool, severity: int
) -> tuple[np.ndarray, float]:
    """Render one scan: uint8 volume (depth, slice_size, slice_size) through ``DEFAULT_WINDOW``, and
    the involved share of lung in [0, 1]. Severity 0 is negative, or positive with a random category."""
    phantom = render_phantom(rng, depth=depth, slice_size=slice_size, has_covid=has_covid, severity=severity)
    return DEFAULT_WINDOW.to_uint8(phantom.hu), phantom.fraction


def mask_path(data_dir: Path, scan: Path) -> Path:
    """Where ``generate_dataset(masks=True)`` wrote the masks of ``scan`` (a scan folder below ``data_dir``)."""
    relative = Path(scan).resolve().relative_to(Path(data_dir).resolve())
    return Path(data_dir) / MASKS_FOLDER / relative.parent / f"{relative.name}{MASK_SUFFIX}"


def read_masks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (lesion, lung) bool masks (depth, S, S) of one scan, from ``mask_path``."""
    with np.load(path) as archive:
        return archive["lesion"], archive["lung"]


def _scan_name(number: int, no_underscore: bool) -> str:
    return f"ct_scan{number}" if no_underscore else f"ct_scan_{number}"


def _split_sizes(scans: int, test_scans: int | None) -> dict[str, int]:
    test = round(scans * TEST_SHARE) if test_scans is None else test_scans
    validation = round(scans * VALIDATION_SHARE)
    train = scans - test - validation
    if test < 0 or train < 2 or validation < 2:
        raise Cov3dError(
            f"cannot split {scans} synthetic scans ({test_scans=}) into train, validation and test: "
            f"use at least {SYNTHETIC_SCANS.low} scans and a smaller test_scans"
        )
    return {"train": train, "validation": validation, TEST_FOLDER: test}


def _severities(rng: np.random.Generator, n: int) -> np.ndarray:
    """Categories 1..4 cycling from a random start and shuffled, so every category appears when n >= 4."""
    return rng.permutation((np.arange(n) + rng.integers(4)) % 4 + 1)


def _plan(rng: np.random.Generator, out_dir: Path, sizes: dict[str, int], annotated_fraction: float,
          depth_scale: float, slice_size: int, mixed_size_fraction: float) -> list[_ScanPlan]:
    """Decide labels, names, depths and mixed sizes of every scan."""
    total = sum(sizes.values())
    depths = sample_depths(rng, total, depth_scale)
    depths[rng.choice(total, size=len(FORCED_SHORT_DEPTHS), replace=False)] = FORCED_SHORT_DEPTHS
    no_underscore = np.zeros(total, dtype=bool)
    no_underscore[rng.choice(total, size=max(1, round(total * NO_UNDERSCORE_SHARE)), replace=False)] = True
    seeds = np.random.SeedSequence(int(rng.integers(2**63))).spawn(total)
    plans: list[_ScanPlan] = []
    for partition, n in sizes.items():
        n_covid = min(max(round(n * COVID_SHARE), 1), n - 1) if n >= 2 else n
        covid = rng.permutation(np.arange(n) < n_covid)
        severity = np.zeros(n, dtype=int)
        severity[covid] = _severities(rng, n_covid)
        annotated = np.zeros(n, dtype=bool)
        if partition != TEST_FOLDER:
            annotated[rng.permutation(np.flatnonzero(covid))[: math.floor(n_covid * annotated_fraction + 0.5)]] = True
        counters = {True: 0, False: 0}
        for has_covid, sev, ann in zip(covid.tolist(), severity.tolist(), annotated.tolist()):
            k = len(plans)
            number = counters[has_covid] if partition != TEST_FOLDER else counters[True] + counters[False]
            counters[has_covid] += 1
            parent = out_dir / TEST_FOLDER if partition == TEST_FOLDER else out_dir / partition / CLASS_FOLDERS[has_covid]
            plans.append(_ScanPlan(parent / _scan_name(number, bool(no_underscore[k])), has_covid, sev, ann,
                                   int(depths[k]), seeds[k]))
    candidates = [plan for plan in plans if plan.depth >= 2]
    n_mixed = min(len(candidates), math.ceil(mixed_size_fraction * total))
    for index in rng.choice(len(candidates), size=n_mixed, replace=False):
        candidates[index].mixed_size = max(8, round(slice_size * float(rng.choice(MIXED_SIZE_FACTORS))))
    return plans


def _write_scan(plan: _ScanPlan, slice_size: int, masks_to: Path | None = None) -> float:
    """Render and save one scan as numbered JPEG slices (and its masks to ``masks_to``); returns
    the involved share of lung."""
    rng = np.random.default_rng(plan.seed)
    phantom = render_phantom(rng, depth=plan.depth, slice_size=slice_size, has_covid=plan.has_covid,
                             severity=plan.severity)
    volume, fraction = DEFAULT_WINDOW.to_uint8(phantom.hu), phantom.fraction
    if masks_to is not None:
        masks_to.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(masks_to, lesion=phantom.lesion, lung=phantom.lung)
    other = np.zeros(plan.depth, dtype=bool)
    if plan.mixed_size is not None:
        start = int(rng.integers(plan.depth))
        other[start : start + max(1, plan.depth // 3)] = True  # never all: depth >= 2
    plan.folder.mkdir(parents=True)
    for i, pixels in enumerate(volume):
        image = Image.fromarray(pixels)
        if other[i]:
            image = image.resize((plan.mixed_size, plan.mixed_size), Image.Resampling.BICUBIC)
        image.save(plan.folder / f"{i}.jpg", quality=JPEG_QUALITY)
    return fraction


def _render_and_write(plan: _ScanPlan, slice_size: int, masks_to: Path | None) -> None:
    """``_write_scan``, with running out of memory as a one-line error naming the scan."""
    try:
        _write_scan(plan, slice_size, masks_to)
    except MemoryError:
        raise Cov3dError(
            f"not enough memory to render {plan.folder} ({plan.depth} slices of {slice_size}x{slice_size}): "
            "use a smaller `slice_size` or `depth_scale`"
        ) from None


def _written(plans: list[_ScanPlan], slice_size: int, masks_to: list[Path | None], workers: int | None) -> Iterator[None]:
    """Write the scans of ``plans`` in order, in this process or in ``workers`` processes; yields after each."""
    WORKERS.check("workers", workers)
    if workers == 1 or len(plans) <= 1:
        for plan, masks in zip(plans, masks_to):
            yield _render_and_write(plan, slice_size, masks)
        return
    from cov3d.preprocessing.workers import available_cpus, init_worker, pool_context  # imports torch

    count = min(workers or available_cpus(), len(plans))
    with ProcessPoolExecutor(count, mp_context=pool_context(__name__), initializer=init_worker) as executor:
        yield from executor.map(_render_and_write, plans, repeat(slice_size), masks_to)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=CSV_DELIMITER, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(sorted(rows, key=lambda row: scan_number(row[0])))


def _outputs(out_dir: Path) -> list[Path]:
    return [out_dir / p for p in (*PARTITIONS, TEST_FOLDER, *SEVERITY_CSVS.values(), TEST_LABELS_CSV, MASKS_FOLDER,
                                  SYNTHETIC_MARKER)]


def generate_dataset(
    out_dir: Path,
    *,
    scans: int = SYNTHETIC_DEFAULTS.scans,
    seed: int = SYNTHETIC_DEFAULTS.seed,
    slice_size: int = SYNTHETIC_DEFAULTS.slice_size,
    depth_scale: float = SYNTHETIC_DEFAULTS.depth_scale,
    annotated_fraction: float = SYNTHETIC_DEFAULTS.annotated_fraction,
    test_scans: int | None = None,
    mixed_size_fraction: float = SYNTHETIC_DEFAULTS.mixed_size_fraction,
    overwrite: bool = False,
    masks: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = 1,
) -> SyntheticSummary:
    """Write a synthetic COV19-CT-DB-style dataset of ``scans`` scans (test included) under ``out_dir``.

    ``depth_scale`` multiplies the realistic slice counts (0.1: ~6 and ~33 slices at the two modes);
    ``test_scans`` defaults to 20 % of ``scans``. ``overwrite`` removes what an earlier run wrote there;
    otherwise those paths must not exist. ``masks`` also writes each scan's lesion and lung masks
    (``mask_path``). ``progress(done, total)`` is called after each scan. ``workers`` processes render
    the scans (``None``: every core); each scan has its own seed, so the bytes do not depend on it.
    """
    out_dir = Path(out_dir)
    SYNTHETIC_SCANS.check("scans", scans)
    SEED.check("seed", seed)
    SLICE_SIZE.check("slice_size", slice_size)
    DEPTH_SCALE.check("depth_scale", depth_scale)
    FRACTION.check("annotated_fraction", annotated_fraction)
    FRACTION.check("mixed_size_fraction", mixed_size_fraction)
    OPTIONAL_COUNT.check("test_scans", test_scans)
    sizes = _split_sizes(scans, test_scans)
    existing = [p for p in _outputs(out_dir) if p.exists()]
    if existing and not overwrite:
        raise Cov3dError(f"{existing[0]} already exists: choose an empty output directory or pass overwrite")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SYNTHETIC_MARKER).write_text(json.dumps({"generator": "cov3d synthetic", "cov3d": __version__, "seed": seed}))
    rng = np.random.default_rng(seed)
    plans = _plan(rng, out_dir, sizes, annotated_fraction, depth_scale, slice_size, mixed_size_fraction)
    summary = SyntheticSummary(out_dir=out_dir, depths=[plan.depth for plan in plans])
    masks_to = [mask_path(out_dir, plan.folder) if masks else None for plan in plans]
    for done, _ in enumerate(_written(plans, slice_size, masks_to, workers), start=1):
        if progress is not None:
            progress(done, len(plans))

    for partition in PARTITIONS:
        mine = [plan for plan in plans if plan.folder.parent.parent.name == partition]
        summary.counts[partition] = {name: sum(p.has_covid == c for p in mine) for c, name in CLASS_FOLDERS.items()}
        rows = [(plan.folder.name, plan.severity) for plan in mine if plan.annotated]
        summary.annotated[partition] = {name: sum(s == i for _, s in rows) for i, name in enumerate(SEVERITY_LABELS, 1)}
        _write_csv(out_dir / SEVERITY_CSVS[partition], ("Name", "Category"), rows)
    tests = [plan for plan in plans if plan.folder.parent.name == TEST_FOLDER]
    summary.counts[TEST_FOLDER] = {name: sum(p.has_covid == c for p in tests) for c, name in CLASS_FOLDERS.items()}
    (out_dir / TEST_FOLDER).mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / TEST_LABELS_CSV, ("Name", "Covid", "Category"),
               [(plan.folder.name, int(plan.has_covid), plan.severity) for plan in tests])
    summary.mixed_size_scans = [str(p.folder.relative_to(out_dir)) for p in plans if p.mixed_size is not None]
    return summary
