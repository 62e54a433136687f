"""What an adversarial user tried: every case ends with its exit code, one line of error (never a
traceback) and nothing of the user's changed; the other scans of a run go on.

Validation comes before any data is read, so most tests here train nothing.
"""

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from cli_checks import error_line, invoke

from cov3d.errors import Cov3dError
from cov3d.limits import DROPOUT, SEED, SMOOTHING, SYNTHETIC_SCANS

# Every numeric option is checked at the boundary, before any data is read.

TRAIN_OPTIONS = [
    ("--learning-rate", "nan"), ("--learning-rate", "-1"), ("--learning-rate", "0"), ("--learning-rate", "inf"),
    ("--weight-decay", "-5"), ("--weight-decay", "nan"), ("--dropout", "1.0"), ("--dropout", "-0.1"),
    ("--presence-smoothing", "1"), ("--severity-smoothing", "-0.1"), ("--severity-factor", "1.5"),
    ("--epochs", "0"), ("--batch-size", "0"), ("--penultimate", "0"), ("--depth", "0"), ("--height", "0"),
    ("--seed", str(2**64)), ("--seed", "-1"), ("--seed", str(2**32)), ("--workers", "0"), ("--loader-workers", "-1"),
]


@pytest.mark.parametrize(("option", "value"), TRAIN_OPTIONS)
def test_train_refuses_a_number_out_of_range_before_reading_data(tmp_path, tiny_dataset, option, value):
    result = invoke("train", "--directory", tiny_dataset, "--output-dir", tmp_path / "run", "--cache-dir",
                    tmp_path / "cache", "--no-pretrained", option, value)
    error_line(result, option, "must be")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_train_refuses_a_batch_larger_than_the_training_set(tmp_path, tiny_dataset):
    scans = sum(1 for label in ("covid", "non-covid") for _ in (tiny_dataset / "train" / label).iterdir())
    result = invoke("train", "--directory", tiny_dataset, "--output-dir", tmp_path / "run", "--cache-dir",
                    tmp_path / "cache", "--no-pretrained", "--batch-size", scans + 1)
    error_line(result, f"--batch-size {scans + 1}", f"{scans} readable training scans", "no step")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("option", "value"), [
    ("--seed", str(2**64)), ("--seed", "-1"), ("--batch-size", "0"), ("--mc-samples", "-1"), ("--workers", "-1"),
])
def test_infer_refuses_a_number_out_of_range(tmp_path, tiny_dataset, option, value):
    result = invoke("infer", tiny_dataset / "test", "--model", tmp_path / "no-model", "--output",
                    tmp_path / "preds.csv", "--cache-dir", tmp_path / "cache", option, value)
    error_line(result, option, "must be")
    assert not (tmp_path / "preds.csv").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("option", "value"), [("--width", "0"), ("--depth", "-1"), ("--workers", "0")])
def test_preprocess_refuses_a_number_out_of_range(tmp_path, tiny_dataset, option, value):
    result = invoke("preprocess", tiny_dataset / "test", "--cache-dir", tmp_path / "cache", option, value)
    error_line(result, option, "must be")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("option", "value"), [
    ("--seed", "-1"), ("--seed", str(2**64)), ("--depth-scale", "1e7"), ("--depth-scale", "nan"),
    ("--depth-scale", "0"), ("--slice-size", "200000"), ("--slice-size", "4"), ("--scans", "6"), ("--scans", "7"),
])
def test_synthetic_refuses_a_number_out_of_range(tmp_path, option, value):
    result = invoke("synthetic", tmp_path / "data", "--scans", 8, "--slice-size", 16, option, value)
    error_line(result, option, "must be")
    assert not (tmp_path / "data").exists()


def test_synthetic_minimum_is_what_the_split_needs(tmp_path):
    """The message's minimum is the smallest count that splits: one less cannot give validation 2 scans."""
    from cov3d.synthetic.generator import _split_sizes

    line = error_line(invoke("synthetic", tmp_path / "data", "--scans", SYNTHETIC_SCANS.low - 1), "--scans")
    assert f">= {SYNTHETIC_SCANS.low}" in line
    assert min(_split_sizes(SYNTHETIC_SCANS.low, None).values()) >= 2
    with pytest.raises(Cov3dError, match=f"at least {SYNTHETIC_SCANS.low} scans"):
        _split_sizes(SYNTHETIC_SCANS.low - 1, None)


@pytest.mark.parametrize(("option", "value"), [("--scans", "19"), ("--epochs", "0"), ("--seed", "-1"), ("--workers", "0")])
def test_demo_refuses_a_number_out_of_range_before_generating(tmp_path, option, value):
    error_line(invoke("demo", "--output", tmp_path / "demo", option, value), option, "must be")
    assert not (tmp_path / "demo").exists()


def test_dropout_and_smoothing_have_one_range():
    """The settings, the model, a model file's config and the loss all refuse 1.0 and take 0.99."""
    from cov3d.model.files import check_config
    from cov3d.model.loss import Cov3dLoss
    from cov3d.model.network import build_model
    from cov3d.training.train import TrainSettings

    assert DROPOUT.problem(1.0) and not DROPOUT.problem(0.99) and SMOOTHING.problem(1.0) and SEED.problem(2**32)
    config = {"depth": 8, "height": 8, "width": 8, "outputs": 6, "penultimate": 4, "pool": "avg"}
    with pytest.raises(Cov3dError, match="dropout"):
        TrainSettings(dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        build_model(dropout=1.0)
    with pytest.raises(Cov3dError, match="dropout"):
        check_config({**config, "dropout": 1.0}, "config.json")
    with pytest.raises(ValueError, match="smoothing"):
        Cov3dLoss(presence_smoothing=1.0)
    with pytest.raises(Cov3dError, match="smoothing"):
        TrainSettings(severity_smoothing=1.0)
    TrainSettings(dropout=0.99, presence_smoothing=0.99)
    build_model(dropout=0.99, penultimate=4)
    check_config({**config, "dropout": 0.99}, "config.json")
    Cov3dLoss(presence_smoothing=0.99, severity_smoothing=0.99)


# A resumed run is the run that was started (the exactness test is in test_resume.py).

@pytest.mark.parametrize("text", ['{"depth": 8, "wid', "", "[1, 2]", '{"depth": 8, "width": 32}'])
def test_resume_with_a_truncated_or_incomplete_config_is_one_line(tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    line = error_line(invoke("train", "--resume", run), str(run / "config.json"))
    assert any(word in line for word in ("not valid JSON", "incomplete", "JSON object"))
    assert (run / "config.json").read_text() == text and sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_resume_with_an_invalid_recorded_setting_is_one_line(tmp_path):

    from cov3d.training.train import TrainSettings

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**TrainSettings().to_config(), "learning_rate": -1, "data_dir": str(tmp_path)}))
    error_line(invoke("train", "--resume", run), str(run / "config.json"), "invalid setting", "--learning-rate")


# Special files and symbolic link loops: skipped or refused per scan with a reason; the rest goes on.

@pytest.fixture
def no_hang():
    """Fail (instead of blocking the suite forever) if a command hangs, e.g. opening a FIFO."""
    def hung(*_):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def odd_scans(tmp_path, tiny_dataset) -> dict[str, Path]:
    """A copy of the tiny test split where one scan has a FIFO for a slice, one a slice linked to
    itself, and the folder holds a self-looping link; the other scans are intact."""
    root = tmp_path / "scans"
    shutil.copytree(tiny_dataset / "test", root)
    scans = sorted(p for p in root.iterdir() if p.is_dir())
    fifo_scan, loop_scan = scans[0], scans[1]
    first = min(fifo_scan.glob("*.jpg"))
    first.unlink()
    os.mkfifo(first)
    loop_slice = min(loop_scan.glob("*.jpg"))
    loop_slice.unlink()
    loop_slice.symlink_to(loop_slice.name)
    (root / "loop").symlink_to("loop")
    return {"root": root, "fifo": fifo_scan, "loop": loop_scan, "intact": scans[2:]}


def assert_failed_scans(result, odd_scans):
    failures = [line for line in result.output.splitlines() if line.startswith("Failed")]
    assert len(failures) == 2, result.output
    assert str(odd_scans["fifo"]) in failures[0] and "FIFO (named pipe)" in failures[0]
    assert str(odd_scans["loop"]) in failures[1] and "symbolic link" in failures[1]
    assert "Traceback" not in result.output


def test_preprocess_skips_special_files_and_link_loops(tmp_path, odd_scans, no_hang):
    result = invoke("preprocess", odd_scans["root"], "--depth", 8, "--width", 32, "--cache-dir", tmp_path / "cache",
                    "--workers", 1)
    assert result.exit_code == 1
    assert_failed_scans(result, odd_scans)
    assert f"{len(odd_scans['intact'])} processed, 0 up to date, 2 failed." in result.output
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == len(odd_scans["intact"])


def test_infer_skips_special_files_and_link_loops(tmp_path, odd_scans, tiny_run, no_hang):
    output = tmp_path / "preds.csv"
    result = invoke("infer", odd_scans["root"], "--model", tiny_run, "--output", output, "--cache-dir",
                    tmp_path / "cache", "--device", "cpu", "--workers", 0)
    assert result.exit_code == 1
    assert_failed_scans(result, odd_scans)
    with output.open() as handle:
        assert sorted(row["name"] for row in csv.DictReader(handle)) == sorted(p.name for p in odd_scans["intact"])


def test_stats_reports_special_files_without_opening_them(tmp_path, odd_scans, no_hang):
    result = invoke("stats", odd_scans["root"], "--output", tmp_path / "stats")
    assert result.exit_code == 0, result.output
    warnings = (tmp_path / "stats" / "warnings.txt").read_text()
    assert "FIFO (named pipe)" in warnings and "symbolic link loop" in warnings
    assert f"{len(odd_scans['intact']) + 2} scans" in result.output


# Label files: odd characters, encodings, missing fields and contradictions are one line naming file and line.

@pytest.fixture
def labelled_copy(tmp_path, tiny_dataset) -> Path:
    """A copy of the tiny dataset whose label files a test may spoil."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def first_covid_scan(data: Path) -> str:
    return min(p.name for p in (data / "train" / "covid").iterdir())


@pytest.mark.parametrize(("rows", "fragments"), [
    (["{name};\u00b2"], ["line 2", "'\u00b2'", "not 1, 2, 3 or 4"]),  # passes str.isdigit(), fails int()
    (["{name};2", "{name};3"], ["line 3", "{name}", "listed twice"]),
])
def test_train_refuses_a_bad_severity_csv(tmp_path, labelled_copy, rows, fragments):
    csv_path = labelled_copy / "train_partition_covid_categories.csv"
    name = first_covid_scan(labelled_copy)
    csv_path.write_text("Name;Category\n" + "".join(row.format(name=name) + "\n" for row in rows), encoding="utf-8")
    before = csv_path.read_bytes()
    result = invoke("train", "--directory", labelled_copy, "--output-dir", tmp_path / "run", "--cache-dir",
                    tmp_path / "cache", "--no-pretrained")
    error_line(result, str(csv_path), *(fragment.format(name=name) for fragment in fragments))
    assert csv_path.read_bytes() == before and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_severity_csv_may_repeat_a_name_with_the_same_category(labelled_copy):
    from cov3d.dataset.layout import read_severity_csv

    csv_path = labelled_copy / "train_partition_covid_categories.csv"
    name = first_covid_scan(labelled_copy)
    csv_path.write_text(f"Name;Category\n{name};2\n{name};2\n")
    assert read_severity_csv(csv_path) == {name: 2}


def test_stats_refuses_a_latin1_csv(tmp_path, labelled_copy):
    csv_path = labelled_copy / "val_partition_covid_categories.csv"
    csv_path.write_bytes("Name;Category\nct_scan_\xe9;2\n".encode("latin-1"))
    error_line(invoke("stats", labelled_copy, "--output", tmp_path / "stats"), str(csv_path), "not UTF-8", "0xe9")
    assert not (tmp_path / "stats").exists()


@pytest.mark.parametrize(("row", "fragments"), [
    ("{name};1", ["line 2", "expected 'Name;Covid;Category'"]),  # a missing field
    ("{name};7;9", ["line 2", "Covid '7' and Category '9'"]),
    ("{name};1;9", ["Category '9'"]),
    ("{name};0;3", ["Covid '0' and Category '3'"]),
    ("{name};x;1", ["Covid 'x'"]),
])
def test_stats_refuses_a_bad_answer_key(tmp_path, labelled_copy, row, fragments):
    key = labelled_copy / "test_labels.csv"
    name = min(p.name for p in (labelled_copy / "test").iterdir())
    key.write_text("Name;Covid;Category\n" + row.format(name=name) + "\n")
    error_line(invoke("stats", labelled_copy, "--output", tmp_path / "stats"), str(key), *fragments)
    assert not (tmp_path / "stats").exists()


def test_an_answer_key_row_listed_twice_differently_is_refused(labelled_copy):
    from cov3d.dataset.layout import read_answer_key

    key = labelled_copy / "test_labels.csv"
    key.write_text("Name;Covid;Category\nct_scan_1;1;2\nct_scan_1;1;2\nct_scan_2;0;\n")
    assert read_answer_key(key) == {"ct_scan_1": (1, 2), "ct_scan_2": (0, 0)}
    key.write_text("Name;Covid;Category\nct_scan_1;1;2\nct_scan_1;0;0\n")
    with pytest.raises(Cov3dError, match="line 3: ct_scan_1 is listed twice"):
        read_answer_key(key)


# Images, weights and names that looked fine but were not.

def test_a_float_tiff_named_jpg_fails_its_scan_with_the_reason(tmp_path, tiny_dataset):
    import numpy as np
    from PIL import Image

    root = Path(shutil.copytree(tiny_dataset / "test", tmp_path / "scans"))
    scans = sorted(p for p in root.iterdir() if p.is_dir())
    slice_path = min(scans[0].glob("*.jpg"))
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(slice_path, format="TIFF")
    result = invoke("preprocess", root, "--depth", 8, "--width", 32, "--cache-dir", tmp_path / "cache", "--workers", 1)
    assert result.exit_code == 1 and "Traceback" not in result.output
    failures = [line for line in result.output.splitlines() if line.startswith("Failed")]
    assert len(failures) == 1 and str(slice_path) in failures[0] and "unsupported image mode F" in failures[0]
    assert f"{len(scans) - 1} processed" in result.output


def test_garbage_pretrained_weights_are_one_line(tmp_path, tiny_dataset):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(os.urandom(4096))
    result = invoke("train", "--directory", tiny_dataset, "--output-dir", tmp_path / "run", "--cache-dir",
                    tmp_path / "cache", "--pretrained-weights", weights)
    line = error_line(result, str(weights), "not a PyTorch state-dict file")
    run_start = ("Precision: ", "Reproducibility: ")  # what every run says first
    said = [text for text in result.output.strip().splitlines() if not text.startswith(run_start)]
    assert "weights_only" not in result.output and said == [line], result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_export_to_a_name_just_within_the_limit(tmp_path, tiny_run):
    out = tmp_path / ("m" * (252 - len(".safetensors")) + ".safetensors")
    result = invoke("export", tiny_run, out)
    assert result.exit_code == 0, result.output
    assert len(out.name) == 252 and out.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left


@pytest.mark.slow
def test_summary_is_valid_json_when_no_validation_scan_is_graded(tmp_path, labelled_copy):
    (labelled_copy / "val_partition_covid_categories.csv").write_text("Name;Category\n")
    run = tmp_path / "run"
    result = invoke("train", "--directory", labelled_copy, "--output-dir", run, "--cache-dir", tmp_path / "cache",
                    "--depth", 8, "--width", 32, "--epochs", 1, "--penultimate", 8, "--no-pretrained",
                    "--workers", 1, "--device", "cpu", "--precision", "fp32")
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads((run / "summary.json").read_text(), parse_constant=refuse)
    assert summary["best_scores"]["severity_f1"] is None and summary["best_scores"]["presence_f1"] is not None
    assert "severity_f1 none" in result.output
