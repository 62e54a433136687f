"""The COV19-CT-DB dataset layout: folder and CSV names, class names and the CSV readers.

Torch-free, so that ``cov3d stats`` and the synthetic-data writer share it with the training
code without importing the deep-learning stack.

- ``<data>/<partition>/<covid|non-covid>/<scan>/<integer>.jpg`` for the labelled partitions;
- ``<data>/<severity CSV>``: ``Name;Category`` with categories 1..4 (mild..critical) for the
  annotated covid scans of a partition (``SEVERITY_CSVS``);
- an unlabelled partition ``<data>/<partition>/<scan>`` may have an answer key
  ``<data>/<partition>_labels.csv`` (``Name;Covid;Category``, category 0 when not graded), as
  ``cov3d synthetic`` writes for its test split.
"""

from __future__ import annotations

import csv
from pathlib import Path

from cov3d.errors import Cov3dError

PRESENCE_CLASSES = ("non-covid", "covid")
SEVERITY_GROUPS = ("negative", "positive-unannotated", "mild", "moderate", "severe", "critical")
SEVERITY_LABELS = SEVERITY_GROUPS[2:]
"""The four severity categories 1..4 of the COV19-CT-DB CSVs (paper Table 2)."""
SEVERITY_CLASSES = ("negative", *SEVERITY_LABELS)
"""The five severity classes 0..4 a run's summary lists: negative, then the four categories."""

PARTITIONS = ("train", "validation")
PRESENCE_FOLDERS = {"non-covid": 0, "covid": 1}
SEVERITY_CSVS = {
    "train": "train_partition_covid_categories.csv",
    "validation": "val_partition_covid_categories.csv",
}
SEVERITY_CATEGORIES = dict(enumerate(SEVERITY_LABELS, start=1))
CSV_DELIMITER = ";"
ANSWER_KEY = "{partition}_labels.csv"
"""Optional labels of an unlabelled partition: ``Name;Covid;Category`` (';'-delimited)."""
SYNTHETIC_MARKER = "cov3d-synthetic.json"
"""Written by ``cov3d synthetic`` at the top of its datasets (what made them): a model trained on a
folder holding it is recorded as trained on synthetic data (the ``synthetic-model`` flag)."""


def read_severity_csv(csv_path: Path) -> dict[str, int]:
    """Read a `Name;Category` CSV into {scan name: category 1..4}; one-line errors for malformed files."""
    if not csv_path.is_file():
        raise Cov3dError(
            f"Severity CSV not found: {csv_path}. Put the competition's CSV there, or train with `severity_factor=0`."
        )
    rows = _csv_rows(csv_path)
    if not rows or [cell.strip() for cell in rows[0][:2]] != ["Name", "Category"]:
        raise Cov3dError(f"{csv_path}: the first line must be the header 'Name;Category' (';'-delimited).")
    categories: dict[str, int] = {}
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise Cov3dError(f"{csv_path}, line {line_number}: expected 'Name;Category', got {';'.join(row)!r}.")
        name, category = row[0].strip(), row[1].strip()
        if _small_integer(category) not in SEVERITY_CATEGORIES:
            raise Cov3dError(f"{csv_path}, line {line_number}: category {category!r} for {name} is not 1, 2, 3 or 4.")
        _refuse_contradiction(csv_path, line_number, name, categories.get(name), int(category))
        categories[name] = int(category)
    return categories


def read_answer_key(path: Path) -> dict[str, tuple[int, int]]:
    """``Name;Covid;Category`` -> {name: (covid 0/1, category 0..4)}; category 0 (or empty) when
    not graded, and always for covid 0. One-line errors name the file and line of a bad row."""
    rows = _csv_rows(path)
    if not rows or [cell.strip() for cell in rows[0][:3]] != ["Name", "Covid", "Category"]:
        raise Cov3dError(f"{path}: the first line must be the header 'Name;Covid;Category' (';'-delimited).")
    key: dict[str, tuple[int, int]] = {}
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 3:
            raise Cov3dError(f"{path}, line {line_number}: expected 'Name;Covid;Category', got {';'.join(row)!r}.")
        name, covid, category = row[0].strip(), _small_integer(row[1].strip()), _small_integer(row[2].strip() or "0")
        if covid not in (0, 1) or category not in range(len(SEVERITY_CATEGORIES) + 1) or (covid == 0 and category):
            raise Cov3dError(
                f"{path}, line {line_number}: {name} has Covid {row[1].strip()!r} and Category {row[2].strip()!r}; "
                "Covid must be 0 or 1 and Category 0..4 (0 when not graded, and for Covid 0)."
            )
        _refuse_contradiction(path, line_number, name, key.get(name), (covid, category))
        key[name] = (covid, category)
    return key


def _csv_rows(path: Path) -> list[list[str]]:
    """The rows of a ';'-delimited UTF-8 CSV file (a byte-order mark is allowed)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return list(csv.reader(handle, delimiter=CSV_DELIMITER))
    except UnicodeDecodeError as error:
        raise Cov3dError(
            f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
            "save it as UTF-8 and run again."
        ) from None


def _small_integer(text: str) -> int | None:
    """The value of ASCII digits (``'3'``, ``'03'``); ``None`` for anything else (``'²'``, ``'3.0'``, ``''``)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _refuse_contradiction(path: Path, line_number: int, name: str, earlier: object, value: object) -> None:
    """A name listed twice must say the same both times."""
    if earlier is not None and earlier != value:
        raise Cov3dError(
            f"{path}, line {line_number}: {name} is listed twice with different labels; keep one line for it."
        )
