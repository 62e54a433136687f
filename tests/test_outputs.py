"""The write guards of cov3d.outputs, called directly: inputs, run files, existing files (CSV
headers, figure markers, output-folder manifests) and scan names in submission files."""

import json

import pytest
from matplotlib.figure import Figure

from cov3d.errors import Cov3dError
from cov3d.outputs import (
    MANIFEST_FILE,
    OutputFolder,
    check_figure,
    check_output,
    csv_header,
    figure_metadata,
    has_figure_marker,
    has_header,
    refuse_inside,
    refuse_run_file,
    submission_name_problem,
)
from cov3d.runfiles import CONFIG_FILE, METRICS_FILE, RESUME_FILE, WEIGHTS_FILES

HEADER = ("scan", "covid_probability")


def never_own(path):
    return False


def test_an_output_inside_or_over_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "ct_scan_1").mkdir(parents=True)
    with pytest.raises(Cov3dError, match="inside the input folder"):
        refuse_inside(data / "ct_scan_1" / "out.csv", [data])
    with pytest.raises(Cov3dError, match="over the input folder"):
        refuse_inside(data, [data])
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(Cov3dError, match="inside the input folder"):
        refuse_inside(link / "out.csv", [data])  # through a link as well
    refuse_inside(tmp_path / "out.csv", [data])


def test_a_runs_own_files_are_refused_only_inside_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("")
    refuse_run_file(run / METRICS_FILE)  # no config.json beside weights: not a run
    (run / CONFIG_FILE).write_text("{}")
    (run / WEIGHTS_FILES["severity"]).write_bytes(b"")
    for name in (METRICS_FILE, CONFIG_FILE, RESUME_FILE):
        with pytest.raises(Cov3dError, match="file of the cov3d run"):
            refuse_run_file(run / name)
    refuse_run_file(run / "predictions.csv")


def test_check_output_new_own_foreign_and_folder(tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert check_output(out, kind="predictions CSV", is_own=never_own, overwrite=False) is False
    out.write_text("a,b\n")
    with pytest.raises(Cov3dError, match="not an earlier predictions CSV of cov3d: give another --output, or --overwrite"):
        check_output(out, kind="predictions CSV", is_own=never_own, overwrite=False)
    assert check_output(out, kind="predictions CSV", is_own=never_own, overwrite=True) is True
    assert "Replacing" in capsys.readouterr().err and out.read_text() == "a,b\n"  # nothing is written here
    assert check_output(out, kind="predictions CSV", is_own=lambda path: True, overwrite=False) is True
    assert "Replacing earlier predictions CSV" in capsys.readouterr().err
    with pytest.raises(Cov3dError, match="is a folder: give a file name"):
        check_output(tmp_path, kind="predictions CSV", is_own=never_own, overwrite=True)


def test_csv_headers_are_read_from_the_first_line_only(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(",".join(HEADER) + "\nct_scan_1,0.5\n")
    assert csv_header(path) == HEADER and has_header(path, [HEADER])
    assert not has_header(path, [("scan",)])
    path.write_text("no newline at all")
    assert csv_header(path) is None
    path.write_bytes(b"\xff\xfe\n")
    assert csv_header(path) is None
    assert csv_header(tmp_path / "missing.csv") is None


@pytest.mark.parametrize("suffix", ["png", "pdf", "svg", "eps"])
def test_figures_saved_with_the_marker_are_recognised(tmp_path, suffix):
    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1])
    marked, plain = tmp_path / f"marked.{suffix}", tmp_path / f"plain.{suffix}"
    figure.savefig(marked, format=suffix, metadata=figure_metadata(suffix))
    figure.savefig(plain, format=suffix)
    assert has_figure_marker(marked) and not has_figure_marker(plain)


def test_a_figure_without_metadata_is_never_cov3ds(tmp_path):
    assert figure_metadata("jpg") is None
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    assert not has_figure_marker(path)
    with pytest.raises(Cov3dError, match="not an earlier figure"):
        check_figure(path, overwrite=False)


def test_an_output_folder_replaces_only_files_it_recorded(tmp_path, capsys):
    folder = OutputFolder(tmp_path / "stats", kind="stats table", overwrite=False)
    (tmp_path / "stats").mkdir()
    table = tmp_path / "stats" / "table1.csv"
    table.write_text("mine")
    with pytest.raises(Cov3dError, match="table1.csv exists and is not an earlier stats table"):
        folder.claim(["table1.csv", "table2.csv"])
    table.write_text("cov3d's")
    folder.record([table])
    assert json.loads((tmp_path / "stats" / MANIFEST_FILE).read_text())["files"].keys() == {"table1.csv"}
    folder.claim(["table1.csv", "table2.csv"])
    assert "Replacing earlier stats tables in" in capsys.readouterr().err
    table.write_text("edited since")
    with pytest.raises(Cov3dError, match="not an earlier stats table"):
        folder.claim(["table1.csv"])
    OutputFolder(tmp_path / "stats", kind="stats table", overwrite=True).claim(["table1.csv"])


def test_an_output_folder_is_not_a_file_nor_inside_an_input(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(Cov3dError, match="exists and is not a folder"):
        OutputFolder(tmp_path / "file", kind="map", overwrite=True)
    with pytest.raises(Cov3dError, match="inside the input folder"):
        OutputFolder(tmp_path / "data" / "maps", kind="map", overwrite=True, inputs=[tmp_path])


@pytest.mark.parametrize(("name", "problem"), [
    ("ct_scan_1", None), ("", "empty"), ("a\nb", "control character"), ("a;b", "separator"), ("a/b", "separator"),
    ("a\u200bb", "control character"), ("a\u2028b", "control character"), ("ct_scan_\u00e9", None),
])
def test_scan_names_that_cannot_be_a_submission_line(name, problem):
    found = submission_name_problem(name)
    assert found is None if problem is None else problem in found
