"""`cov3d stats`: what a dataset holds, read from file names and image headers only (no decoding).

- depth (slices per scan) histogram with a logarithmic count axis (paper Fig. 1);
- slice sizes: how many scans and slices have each (width x height);
- Table 1: covid / non-covid scans per partition; Table 2: severity annotations per partition;
- anomalies: scan folders without slices, scans mixing slice sizes, two slices of one number
  (``05.jpg`` and ``5.jpg``), unreadable slice headers,
  severity CSV names without a folder in ``<partition>/covid``.

Partitions are the sub-folders of the data folder: ``<partition>/<covid|non-covid>/<scan>`` is
labelled; ``<partition>/<scan>`` (a test set) is not, unless an answer key
``<partition>_labels.csv`` (``Name;Covid;Category``, as written by ``cov3d.synthetic.generator``) lies next
to it. Severities of train and validation come from the competition's category CSVs.

The tables are written here (``write_stats_tables``); ``cov3d.workflows.stats.write_stats`` adds the
depth histogram, drawn by ``cov3d.viz``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cov3d.atomic import write_csv_atomically, write_text_atomically
from cov3d.dataset.filekinds import special_file
from cov3d.dataset.layout import (
    ANSWER_KEY,
    PRESENCE_FOLDERS,
    SEVERITY_CATEGORIES,
    SEVERITY_CSVS,
    read_answer_key,
    read_severity_csv,
)
from cov3d.dataset.scans import (
    READ_ERRORS,
    SLICE_NAME,
    UNSUPPORTED_MODES,
    duplicate_slice_numbers,
    duplicate_slices_message,
    scan_number,
)
from cov3d.errors import Cov3dError, one_line

PARTITION_ORDER = ("train", "validation", "test")
"""Column order of the tables (other partitions follow alphabetically), as in the paper's tables."""
PRESENCE_ROWS = ("covid", "non-covid")
UNLABELLED = ""


@dataclass
class ScanStats:
    """One scan folder: partition, label ('covid', 'non-covid' or '' if unknown), severity 0..4,
    slice count and the (width, height) of each readable slice."""

    path: Path
    partition: str
    label: str
    severity: int
    depth: int
    sizes: Counter = field(default_factory=Counter)


@dataclass
class DatasetStats:
    """All scans of a dataset, the tables and the anomalies found."""

    scans: list[ScanStats]
    partitions: list[str]
    presence_table: dict[str, dict[str, int | None]]
    severity_table: dict[str, dict[str, int | None]]
    warnings: list[str]


def _dirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder`` in scan order."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: (scan_number(p.name), p.name))


def slice_files(scan_dir: Path) -> list[Path]:
    """The ``<integer>.jpg`` files of a folder (unordered; headers only are read)."""
    return [p for p in scan_dir.iterdir() if SLICE_NAME.match(p.name) and not p.is_dir()]


def header_sizes(files: list[Path], warnings: list[str]) -> Counter:
    """Counts of (width, height) read from the image headers; unreadable files become warnings."""
    sizes: Counter = Counter()
    for path in files:
        kind = special_file(path)
        if kind is not None:
            warnings.append(f"unreadable slice {path}: it is {kind}, not a regular file")
            continue
        try:
            with Image.open(path) as image:
                sizes[image.size] += 1
                if image.mode in UNSUPPORTED_MODES:
                    warnings.append(f"unsupported slice {path}: image mode {image.mode} ({UNSUPPORTED_MODES[image.mode]})")
        except READ_ERRORS as error:
            warnings.append(f"unreadable slice {path}: {one_line(error) or type(error).__name__}")
    return sizes


def _partition_scans(data_dir: Path, partition_dir: Path, warnings: list[str]) -> list[ScanStats]:
    """The scans of one partition folder, labelled from the layout, the CSVs or an answer key."""
    partition = partition_dir.name
    labelled = [partition_dir / name for name in PRESENCE_FOLDERS if (partition_dir / name).is_dir()]
    severities: dict[str, int] = {}
    if partition in SEVERITY_CSVS and (data_dir / SEVERITY_CSVS[partition]).is_file():
        severities = read_severity_csv(data_dir / SEVERITY_CSVS[partition])
    key_path = data_dir / ANSWER_KEY.format(partition=partition)
    answers = read_answer_key(key_path) if not labelled and key_path.is_file() else {}
    folders = [(folder, label_dir.name) for label_dir in labelled for folder in _dirs(label_dir)]
    if not labelled:
        folders = [(folder, UNLABELLED) for folder in _dirs(partition_dir)]
    scans = []
    for folder, label in folders:
        files = slice_files(folder)
        if not files:
            warnings.append(f"empty scan: {folder} holds no <integer>.jpg slices")
            continue
        severity = severities.get(folder.name, 0) if label == "covid" else 0
        if folder.name in answers:
            covid, severity = answers[folder.name]
            label = PRESENCE_ROWS[0] if covid else PRESENCE_ROWS[1]
        duplicates = duplicate_slice_numbers([file.name for file in files])
        if duplicates:
            warnings.append(f"duplicate slice numbers: {duplicate_slices_message(folder, duplicates)}")
        sizes = header_sizes(files, warnings)
        if len(sizes) > 1:
            listed = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(sizes.items()))
            warnings.append(f"mixed slice sizes in {folder}: {listed}")
        scans.append(ScanStats(folder, partition, label, severity, len(files), sizes))
    covid_names = {scan.path.name for scan in scans if scan.label == "covid"}
    for name in sorted(set(severities) - covid_names, key=lambda n: (scan_number(n), n)):
        warnings.append(f"{SEVERITY_CSVS[partition]} lists {name}, which has no folder in {partition_dir / 'covid'}")
    return scans


def _partition_key(name: str) -> tuple[int, str]:
    return (PARTITION_ORDER.index(name) if name in PARTITION_ORDER else len(PARTITION_ORDER), name)


def _tables(scans: list[ScanStats], partitions: list[str]) -> tuple[dict, dict]:
    """Table 1 {row: {partition: count or None}} and Table 2 (None where labels are unknown)."""
    presence: dict[str, dict[str, int | None]] = {row: {} for row in (*PRESENCE_ROWS, "total")}
    severity: dict[str, dict[str, int | None]] = {row: {} for row in (*SEVERITY_CATEGORIES.values(), "total")}
    for partition in partitions:
        mine = [scan for scan in scans if scan.partition == partition]
        known = all(scan.label != UNLABELLED for scan in mine)
        for row in PRESENCE_ROWS:
            presence[row][partition] = sum(scan.label == row for scan in mine) if known else None
        presence["total"][partition] = len(mine)
        for category, row in SEVERITY_CATEGORIES.items():
            severity[row][partition] = sum(scan.severity == category for scan in mine) if known else None
        severity["total"][partition] = sum(scan.severity > 0 for scan in mine) if known else None
    return presence, severity


def dataset_stats(data_dir: Path) -> DatasetStats:
    """Scan ``data_dir`` (see the module docstring); ``Cov3dError`` if it holds no scans."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise Cov3dError(f"Data folder not found: {data_dir}. Give the folder that holds train/ and validation/.")
    warnings: list[str] = []
    if any(slice_files(child) for child in _dirs(data_dir)):  # a flat folder of scans: one partition
        scans = _partition_scans(data_dir.parent, data_dir, warnings)
    else:
        scans = [scan for part in _dirs(data_dir) for scan in _partition_scans(data_dir, part, warnings)]
    if not scans:
        raise Cov3dError(f"No scans found in {data_dir}: expected <partition>/<covid|non-covid>/<scan>/<n>.jpg.")
    partitions = sorted({scan.partition for scan in scans}, key=_partition_key)
    presence, severity = _tables(scans, partitions)
    return DatasetStats(scans, partitions, presence, severity, warnings)


def size_counts(scans: list[ScanStats]) -> list[tuple[str, int, int]]:
    """(size 'WxH', scans with at least one slice of it, slices of it), most slices first."""
    slices: Counter = Counter()
    holders: Counter = Counter()
    for scan in scans:
        slices.update(scan.sizes)
        holders.update(scan.sizes.keys())
    return [(f"{w}x{h}", holders[(w, h)], n) for (w, h), n in slices.most_common()]


WRITE_REMEDY = "Free some space or choose another `output` folder."


def _write_table(path: Path, table: dict[str, dict[str, int | None]], partitions: list[str], first: str) -> None:
    rows = [[row, *("" if counts[p] is None else counts[p] for p in partitions)] for row, counts in table.items()]
    write_csv_atomically(path, [[first, *partitions], *rows], WRITE_REMEDY)


STATS_FILES = {
    "partitions": "partitions.csv", "severity": "severity.csv", "scans": "scans.csv",
    "slice_sizes": "slice-sizes.csv", "histogram": "depth-histogram.png", "warnings": "warnings.txt",
}


def check_stats_output(stats: DatasetStats, output_dir: Path, *, overwrite: bool = False):
    """The output folder, checked before anything is written (``cov3d.outputs.OutputFolder``): never
    inside a scan folder; existing files only if unchanged since cov3d wrote them, or ``overwrite``."""
    from cov3d.outputs import OutputFolder

    folder = OutputFolder(output_dir, kind="stats file", overwrite=overwrite, inputs=[scan.path for scan in stats.scans])
    folder.claim(STATS_FILES.values())
    return folder


def stats_paths(output_dir: Path) -> dict[str, Path]:
    """{what: path} of the files ``cov3d stats`` writes into ``output_dir`` (``STATS_FILES``)."""
    return {name: Path(output_dir) / file for name, file in STATS_FILES.items()}


def partition_depths(stats: DatasetStats) -> dict[str, list[int]]:
    """{partition: the depth of each of its scans}, for the depth histogram."""
    return {partition: [scan.depth for scan in stats.scans if scan.partition == partition] for partition in stats.partitions}


def write_stats_tables(stats: DatasetStats, paths: dict[str, Path]) -> None:
    """Write the CSV tables and the warnings to their ``stats_paths`` (the folder exists, and is held)."""
    _write_table(paths["partitions"], stats.presence_table, stats.partitions, "covid")
    _write_table(paths["severity"], stats.severity_table, stats.partitions, "severity")
    scan_rows = [
        [scan.partition, scan.label, scan.severity, scan.path.name, scan.depth,
         " ".join(f"{w}x{h}" for w, h in sorted(scan.sizes)), scan.path]
        for scan in stats.scans
    ]
    header = ["partition", "label", "severity", "name", "depth", "slice_sizes", "path"]
    write_csv_atomically(paths["scans"], [header, *scan_rows], WRITE_REMEDY)
    write_csv_atomically(paths["slice_sizes"], [["size", "scans", "slices"], *size_counts(stats.scans)], WRITE_REMEDY)
    write_text_atomically(paths["warnings"], "".join(f"{warning}\n" for warning in stats.warnings), WRITE_REMEDY)


def stats_report(stats: DatasetStats) -> list:
    """Tables 1 and 2, the slice sizes, the depth range and the warnings, as rich renderables
    (tables and lines) for the caller to print."""
    from rich.table import Table
    from rich.text import Text

    report: list = []
    for title, table, first in (
        ("Table 1: scans per partition", stats.presence_table, "COVID-19"),
        ("Table 2: severity annotations per partition", stats.severity_table, "severity"),
    ):
        shown = Table(title=title)
        shown.add_column(first)
        for partition in stats.partitions:
            shown.add_column(partition, justify="right")
        for row, counts in table.items():
            shown.add_row(row, *("–" if counts[p] is None else f"{counts[p]:,}" for p in stats.partitions))
        report.append(shown)
    sizes = Table(title="Slice sizes")
    for column in ("size", "scans", "slices"):
        sizes.add_column(column, justify="right")
    for size, scans, slices in size_counts(stats.scans):
        sizes.add_row(size, f"{scans:,}", f"{slices:,}")
    report.append(sizes)
    depths = sorted(scan.depth for scan in stats.scans)
    report.append(Text(f"Depth: {depths[0]} to {depths[-1]} slices, median {depths[len(depths) // 2]}, {len(depths)} scans."))
    for warning in stats.warnings:
        report.append(Text.assemble(("Warning:", "yellow"), f" {warning}"))
    return report
