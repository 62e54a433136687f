"""A second round of adversarial inputs (issue 27): volumes without data, processes left behind by a
kill, closed pipes and ASCII consoles, ambiguous slice numbers, and restart advice that leads
somewhere. Each class ends in a one-line error or a working command; tests with real kills are slow."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cov3d.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("Error:") or line.startswith("Failed ")]


def grey_jpeg(path: Path, level: int, size: int = 32) -> None:
    Image.fromarray(np.full((size, size), level, dtype=np.uint8)).save(path)


# Ambiguous slice numbers: 05.jpg and 5.jpg are both slice 5.

@pytest.fixture
def ambiguous_data(tmp_path) -> Path:
    """A folder of two scans: ct_scan_1 holds 0.jpg..5.jpg and also 05.jpg; ct_scan_2 is clean."""
    data = tmp_path / "data"
    for name in ("ct_scan_1", "ct_scan_2"):
        scan = data / name
        scan.mkdir(parents=True)
        for index in range(6):
            grey_jpeg(scan / f"{index}.jpg", 40 * index)
    grey_jpeg(data / "ct_scan_1" / "05.jpg", 255)
    return data


def test_two_files_of_one_slice_number_fail_their_scan_and_stats_reports_them(tmp_path, ambiguous_data):
    result = invoke("preprocess", ambiguous_data, "--cache-dir", tmp_path / "cache", "--workers", "1",
                    "--depth", "4", "--width", "16")
    assert result.exit_code == 1, result.output
    [failed] = error_lines(result.output)
    scan = ambiguous_data / "ct_scan_1"
    assert f"{scan / '05.jpg'} and {scan / '5.jpg'} have the same slice number 5" in failed, failed
    assert "1 processed, 0 up to date, 1 failed" in result.output  # the clean scan is not lost

    result = invoke("stats", ambiguous_data, "-o", tmp_path / "stats")
    assert result.exit_code == 0, result.output
    warnings = (tmp_path / "stats" / "warnings.txt").read_text().splitlines()
    assert warnings == [f"duplicate slice numbers: {scan / '05.jpg'} and {scan / '5.jpg'} have the same slice "
                        "number 5: the slice order is ambiguous. Remove or renumber one of each pair."]
