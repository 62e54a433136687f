"""cov3d show, training curves and confusion matrices: exact pixel sizes, non-blank distinct panels,
labels from the dataset layout, matrices checked against scikit-learn and the run's own scores."""

import csv
import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from figure_checks import assert_panels_differ, assert_size, read_grey
from sklearn.metrics import confusion_matrix as sklearn_confusion, f1_score
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.errors import Cov3dError
from cov3d.inference.views import layout_label, load_tensor_file, show_scans
from cov3d.model.metrics import confusion_macro_f1
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.settings import VolumeShape
from cov3d.training.run_figures import confusion_matrix
from cov3d.viz.figures import mid_planes, peak_voxel, save_figure

runner = CliRunner()
SEVERITY_WORDS = {"1": "mild", "2": "moderate", "3": "severe", "4": "critical"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_categories(path):
    with path.open() as handle:
        return {row["Name"]: row["Category"] for row in csv.DictReader(handle, delimiter=";")}


def test_mid_planes_cut_the_right_axes():
    volume = np.arange(4 * 6 * 8, dtype=float).reshape(4, 6, 8)
    planes = mid_planes(volume)
    assert planes["axial"].shape == (6, 8) and planes["sagittal"].shape == (4, 6) and planes["coronal"].shape == (4, 8)
    assert planes["axial"][1, 2] == volume[2, 1, 2]
    assert planes["sagittal"][3, 5] == volume[3, 5, 4]
    assert planes["coronal"][0, 7] == volume[0, 3, 7]


def test_peak_voxel_takes_the_middle_of_a_plateau():
    attribution = np.zeros((5, 5, 5))
    attribution[1:4, 0:5, 2] = 1.0
    attribution[0, 0, 0] = 0.5
    assert peak_voxel(attribution) == (2, 2, 2)
    attribution[4, 4, 4] = 2.0
    assert peak_voxel(attribution) == (4, 4, 4)


def test_layout_label_reads_folder_and_severity_csv(tiny_dataset):
    categories = read_categories(tiny_dataset / "train_partition_covid_categories.csv")
    name = sorted(categories)[0]
    assert layout_label(tiny_dataset / "train" / "covid" / name) == f"covid, {SEVERITY_WORDS[categories[name]]} (train)"
    negative = next(p for p in sorted((tiny_dataset / "validation" / "non-covid").iterdir()))
    assert layout_label(negative) == "non-covid (validation)"
    assert layout_label(tiny_dataset / "test" / "ct_scan_0") is None


def test_show_command_draws_jpeg_and_cached_scans(tmp_path, tiny_dataset):
    categories = read_categories(tiny_dataset / "train_partition_covid_categories.csv")
    annotated = tiny_dataset / "train" / "covid" / sorted(categories)[0]
    deepest = max((p for p in (tiny_dataset / "train" / "non-covid").iterdir()), key=lambda p: len(list(p.glob("*.jpg"))))
    cache = VolumeCache(tmp_path / "cache", VolumeShape(16, 32, 32))
    cache.update(deepest)
    output = tmp_path / "figs" / "scans.png"
    result = invoke("show", annotated, cache.path_for(deepest), "--output", output)
    assert result.exit_code == 0, result.output
    pixels = assert_size(output, 720, 550)  # 3 panels of 2.4 in x (2.4 + 0.35 in) per row, 100 dpi
    assert_panels_differ(pixels, rows=2, columns=3)


def test_cache_file_is_shown_as_values_in_0_1(tmp_path, tiny_dataset):
    scan = next(p for p in sorted((tiny_dataset / "train" / "covid").iterdir()))
    cache = VolumeCache(tmp_path / "cache", VolumeShape(8, 16, 16))
    assert cache.update(scan)
    volume, source = load_tensor_file(cache.path_for(scan))
    assert torch.equal(volume, cache.get(scan)[0]) and source == scan.resolve()
    assert 0.0 <= float(volume.min()) and float(volume.max()) <= 1.0 and float(volume.max()) > 0.5


def test_show_titles_carry_labels_and_predictions(tmp_path, tiny_dataset, tiny_run):
    scan = tiny_dataset / "validation" / "non-covid" / sorted(p.name for p in (tiny_dataset / "validation" / "non-covid").iterdir())[0]
    titles = show_scans([scan], tmp_path / "one.png", run_dir=tiny_run, cache_dir=tmp_path / "cache", device="cpu")
    # tiny_run learned from `cov3d synthetic` data, so every answer carries that flag
    assert titles[0].startswith(f"{scan.name}  |  non-covid (validation)  |  FLAGGED: synthetic-model  |  predicted ")
    assert_size(tmp_path / "one.png", 720, 275)


def test_show_rejects_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    result = invoke("show", tmp_path / "notes.txt", "--output", tmp_path / "x.png")
    assert result.exit_code == 1 and "notes.txt" in result.output and "Traceback" not in result.output


def test_confusion_matrix_and_f1_match_scikit_learn():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    matrix = confusion_matrix(truth, predicted, 4)
    np.testing.assert_array_equal(matrix, sklearn_confusion(truth, predicted, labels=[0, 1, 2, 3]))
    assert confusion_macro_f1(matrix) == pytest.approx(f1_score(truth, predicted, average="macro", labels=[0, 1, 2, 3]))
    never = np.array([0, 0, 1]), np.array([0, 1, 1])
    assert confusion_macro_f1(confusion_matrix(*never, 3)) == pytest.approx(
        f1_score(*never, average="macro", labels=[0, 1, 2], zero_division=0))


def test_training_writes_curves_and_confusion_matrices(tiny_run, tiny_dataset):
    pixels = assert_size(tiny_run / "curves.png", 800, 320)
    assert_panels_differ(pixels, rows=1, columns=2)
    summary = json.loads((tiny_run / "summary.json").read_text())
    validation = {folder: len(list((tiny_dataset / "validation" / folder).iterdir())) for folder in ("covid", "non-covid")}
    with (tiny_run / "confusion-presence.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["true \\ predicted", "non-covid", "covid"]
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert matrix.sum(axis=1).tolist() == [validation["non-covid"], validation["covid"]]
    assert confusion_macro_f1(matrix) == pytest.approx(summary["best_scores"]["presence_f1"])
    assert_size(tiny_run / "confusion-presence.png", 360, 360)
    assert read_grey(tiny_run / "confusion-presence.png").std() > 8
    covid_names = {p.name for p in (tiny_dataset / "validation" / "covid").iterdir()}
    annotated = [n for n in read_categories(tiny_dataset / "val_partition_covid_categories.csv") if n in covid_names]
    if (tiny_run / "best-severity.safetensors").is_file():
        with (tiny_run / "confusion-severity.csv").open() as handle:
            severity = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]])
        assert severity.shape == (4, 4) and severity.sum() == len(annotated)
        assert confusion_macro_f1(severity) == pytest.approx(summary["best_scores"]["severity_f1"])
    else:
        assert not annotated and not (tiny_run / "confusion-severity.csv").exists()



def test_help_lists_the_figure_commands():
    result = invoke("--help")
    for command in ("show", "stats", "explain"):
        assert command in result.output
    for command in ("show", "stats", "explain"):
        assert invoke(command, "--help").exit_code == 0


def small_figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_figures_take_the_format_of_their_suffix(tmp_path):
    assert save_figure(small_figure(), tmp_path / "a.pdf").read_bytes().startswith(b"%PDF")
    assert save_figure(small_figure(), tmp_path / "b.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(Cov3dError, match=r"c\.xyz: cannot write \.xyz images; end the name with \.png"):
        save_figure(small_figure(), tmp_path / "c.xyz")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.pdf", "b.png"]


def test_a_figure_that_does_not_fit_on_the_disk_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    (tmp_path / "old.png").write_bytes(b"old")

    def full_disk(self, path, **options):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(Cov3dError, match=r"old\.png: No space left on device\. Free some space"):
        save_figure(small_figure(), tmp_path / "old.png")
    assert [path.name for path in tmp_path.iterdir()] == ["old.png"] and (tmp_path / "old.png").read_bytes() == b"old"


def test_drawing_leaves_the_backend_and_the_style_alone():
    """A notebook's backend and settings survive importing cov3d's figures and drawing one."""
    script = (
        "import matplotlib; matplotlib.use('svg'); size = matplotlib.rcParams['font.size'] + 1; "
        "matplotlib.rcParams['font.size'] = size; "
        "from cov3d.viz.figures import depth_histogram; depth_histogram({'train': [1, 2, 3]}); "
        "print(matplotlib.get_backend(), matplotlib.rcParams['font.size'] == size)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["svg", "True"]
