"""A real chest CT series (``../shared/data/real-ct/``, beside the repository) through cov3d:
grey levels like COV19-CT-DB's, preprocessing, ``cov3d show`` and ``cov3d infer``.

The series is public (TCIA Lung-PET-CT-Dx; source and citation in its README) and never copied into
the repository; without the shared folder these tests are skipped.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cov3d.cli import app
from cov3d.dataset.dicom_nifti import grey_slices, scan_sources
from cov3d.dataset.intensity import LEGACY_LUNG_WINDOW, band_distance, band_fractions, middle_half
from cov3d.dataset.scans import find_scans
from cov3d.preprocessing.preprocess import preprocess_scan
from cov3d.window import DEFAULT_WINDOW

REAL_CT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real-ct"
SERIES = REAL_CT / "lung-pet-ct-dx-A0002-thorax-8mm"
MAX_BAND_DISTANCE = 0.35
"""Issue 13: the real series' middle half within this L1 distance of COV19-CT-DB's band fractions."""

pytestmark = pytest.mark.skipif(not SERIES.is_dir(), reason=f"the shared real CT series is not at {SERIES.resolve()}")


def middle_bands(window=DEFAULT_WINDOW):
    sources = scan_sources(SERIES)
    count, slices = grey_slices(sources.kind, sources.files, window)
    keep = set(middle_half(count))
    return band_fractions([grey for index, grey in enumerate(slices) if index in keep])


def test_series_is_found_and_ordered_head_first():
    assert find_scans([REAL_CT]) == [SERIES]
    sources = scan_sources(SERIES)
    assert sources.kind == "dicom" and len(sources.files) == 30
    import pydicom

    z = [float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]) for path in sources.files]
    assert z == sorted(z, reverse=True)


def test_grey_levels_are_like_cov19_ct_db():
    assert band_distance(middle_bands()) <= MAX_BAND_DISTANCE
    assert band_distance(middle_bands(LEGACY_LUNG_WINDOW)) > 0.6  # the former window was far off


def test_preprocessing(tmp_path):
    volume = preprocess_scan(SERIES, 16, 64, 64)
    assert volume.shape == (1, 16, 64, 64)
    middle = volume[0, 4:12].numpy()
    assert 0.0 <= volume.min() and volume.max() <= 1.0
    assert 0.2 < np.mean(middle < 40 / 255) < 0.45  # air around the body, as in COV19-CT-DB


def test_show_and_infer_on_the_command_line(tiny_run, tmp_path):
    runner = CliRunner()
    cache = tmp_path / "cache"
    shown = runner.invoke(app, ["show", str(REAL_CT), "--output", str(tmp_path / "real.png"), "--model", str(tiny_run),
                                "--cache-dir", str(cache), "--device", "cpu", "--precision", "fp32"])
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "real.png").stat().st_size > 10_000
    output = tmp_path / "preds.csv"
    inferred = runner.invoke(app, ["infer", str(REAL_CT), "--model", str(tiny_run), "--output", str(output),
                                   "--cache-dir", str(cache), "--workers", "0", "--device", "cpu", "--precision", "fp32"])
    assert inferred.exit_code == 0, inferred.output
    with output.open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["name"] == SERIES.name and 0.0 <= float(row["covid_probability"]) <= 1.0
    # A chest CT: neither not-ct nor no-lungs; the tiny run was trained on synthetic data.
    assert row["flags"].split(";")[0] == "synthetic-model"
    assert "1 of 1 scans flagged: synthetic-model 1" in inferred.output
