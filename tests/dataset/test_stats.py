"""cov3d stats: every count equals one made independently from the files on disk, the category
CSVs and the test answer key; anomalies are reported; the histogram is an image of the right size."""

import csv
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from figure_checks import assert_size
from PIL import Image
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.dataset.stats import dataset_stats
from cov3d.workflows.stats import write_stats

SLICE = re.compile(r"^\d+\.jpg$")
CATEGORIES = {"1": "mild", "2": "moderate", "3": "severe", "4": "critical"}


def read_rows(path, delimiter=","):
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def table(path):
    """A written table as {row: {partition: cell}}."""
    return {row.pop(next(iter(row))): row for row in read_rows(path)}


def labelled_folders(data, partition):
    return {label: sorted(p for p in (data / partition / label).iterdir() if p.is_dir()) for label in ("covid", "non-covid")}


@pytest.fixture(scope="module")
def written(tiny_dataset, module_dir):
    out = module_dir
    stats = dataset_stats(tiny_dataset)
    write_stats(stats, out)
    return stats, out


def test_partition_table_counts_folders_and_answer_key(written, tiny_dataset):
    _, out = written
    counts = table(out / "partitions.csv")
    for partition in ("train", "validation"):
        folders = labelled_folders(tiny_dataset, partition)
        assert counts["covid"][partition] == str(len(folders["covid"]))
        assert counts["non-covid"][partition] == str(len(folders["non-covid"]))
        assert counts["total"][partition] == str(len(folders["covid"]) + len(folders["non-covid"]))
    key = read_rows(tiny_dataset / "test_labels.csv", ";")
    assert counts["covid"]["test"] == str(sum(row["Covid"] == "1" for row in key))
    assert counts["non-covid"]["test"] == str(sum(row["Covid"] == "0" for row in key))
    assert counts["total"]["test"] == str(len([p for p in (tiny_dataset / "test").iterdir() if p.is_dir()]))


def test_severity_table_counts_csv_rows_with_folders(written, tiny_dataset):
    _, out = written
    counts = table(out / "severity.csv")
    for partition, file_name in (("train", "train_partition_covid_categories.csv"), ("validation", "val_partition_covid_categories.csv")):
        covid = {p.name for p in labelled_folders(tiny_dataset, partition)["covid"]}
        rows = [row for row in read_rows(tiny_dataset / file_name, ";") if row["Name"] in covid]
        expected = Counter(CATEGORIES[row["Category"]] for row in rows)
        for name in CATEGORIES.values():
            assert counts[name][partition] == str(expected[name])
        assert counts["total"][partition] == str(len(rows))
    key = Counter(CATEGORIES.get(row["Category"]) for row in read_rows(tiny_dataset / "test_labels.csv", ";"))
    for name in CATEGORIES.values():
        assert counts[name]["test"] == str(key[name])


def test_depths_and_slice_sizes_match_decoded_slices(written, tiny_dataset):
    stats, out = written
    scans = read_rows(out / "scans.csv")
    folders = sorted(p.parent for p in tiny_dataset.rglob("0.jpg"))
    assert len(scans) == len(folders) == len(stats.scans)
    sizes: Counter = Counter()
    mixed = set()
    by_path = {row["path"]: row for row in scans}
    for folder in folders:
        slices = [p for p in folder.iterdir() if SLICE.match(p.name)]
        shapes = {np.asarray(Image.open(p)).shape[::-1] for p in slices}  # decoded (width, height)
        for p in slices:
            sizes[np.asarray(Image.open(p)).shape[::-1]] += 1
        assert int(by_path[str(folder)]["depth"]) == len(slices)
        if len(shapes) > 1:
            mixed.add(str(folder))
    written_sizes = {row["size"]: int(row["slices"]) for row in read_rows(out / "slice-sizes.csv")}
    assert written_sizes == {f"{w}x{h}": n for (w, h), n in sizes.items()}
    warned = {w.split(" in ", 1)[1].split(":")[0] for w in stats.warnings if w.startswith("mixed slice sizes")}
    assert warned == mixed and mixed  # the generator mixes sizes in at least one scan


def test_depth_histogram_is_a_log_count_image(written):
    _, out = written
    pixels = assert_size(out / "depth-histogram.png", 640, 360)
    assert pixels.std() > 8


def test_anomalies_are_warned(tmp_path, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "train" / "covid" / "ct_scan_99").mkdir()
    with (data / "train_partition_covid_categories.csv").open("a") as handle:
        handle.write("ct_scan_77;2\n")
    warnings = dataset_stats(data).warnings
    assert any("empty scan" in w and "ct_scan_99" in w for w in warnings)
    assert any("ct_scan_77" in w and "no folder" in w for w in warnings)


def test_stats_command_prints_tables(tmp_path, tiny_dataset):
    result = CliRunner().invoke(app, ["stats", str(tiny_dataset), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Table 1" in result.output and "Table 2" in result.output and "Warning:" in result.output
    assert (tmp_path / "out" / "partitions.csv").is_file()
    missing = CliRunner().invoke(app, ["stats", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "nope" in missing.output
