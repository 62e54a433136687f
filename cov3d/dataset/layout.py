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


def read_severity_csv(csv_path: Path) -> dict[str, int]:
    """Read a `Name;Category` CSV into {scan name: category 1..4}; one-line errors for malformed files."""
    if not csv_path.is_file():
        raise Cov3dError(
            f"Severity CSV not found: {csv_path}. Put the competition's CSV there, or train with --severity-factor 0."
        )
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle, delimiter=CSV_DELIMITER))
    if not rows or [cell.strip() for cell in rows[0][:2]] != ["Name", "Category"]:
        raise Cov3dError(f"{csv_path}: the first line must be the header 'Name;Category' (';'-delimited).")
    categories: dict[str, int] = {}
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise Cov3dError(f"{csv_path}, line {line_number}: expected 'Name;Category', got {';'.join(row)!r}.")
        name, category = row[0].strip(), row[1].strip()
        if not category.isdigit() or int(category) not in SEVERITY_CATEGORIES:
            raise Cov3dError(f"{csv_path}, line {line_number}: category {category!r} for {name} is not 1, 2, 3 or 4.")
        categories[name] = int(category)
    return categories


def read_answer_key(path: Path) -> dict[str, tuple[int, int]]:
    """``Name;Covid;Category`` -> {name: (covid 0/1, category 0..4)}."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle, delimiter=CSV_DELIMITER))
    try:
        return {row["Name"].strip(): (int(row["Covid"]), int(row["Category"] or 0)) for row in rows}
    except (KeyError, ValueError, AttributeError):
        raise Cov3dError(f"{path}: expected the header 'Name;Covid;Category' and integer columns.") from None
