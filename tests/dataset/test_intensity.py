"""The calibrated HU -> grey mapping and the band measure it was fitted with."""

import numpy as np
import pytest

from cov3d.dataset.intensity import (
    COV19_CT_DB_AIR_GREY,
    COV19_CT_DB_BANDS,
    LEGACY_LUNG_WINDOW,
    band_distance,
    band_fractions,
    middle_half,
)
from cov3d.errors import Cov3dError
from cov3d.window import DEFAULT_WINDOW, Window


def test_default_is_the_calibrated_window():
    assert str(DEFAULT_WINDOW) == "-470,1410"
    assert DEFAULT_WINDOW.to_uint8(np.array([-2000.0, -1175.0, -470.0, 235.0, 900.0])).tolist() == [0, 0, 128, 255, 255]
    assert abs(DEFAULT_WINDOW.grey(-1000.0) - COV19_CT_DB_AIR_GREY) < 5  # air as in COV19-CT-DB (25-35)
    assert LEGACY_LUNG_WINDOW.grey(-1000.0) > 55  # what the former window did


@pytest.mark.parametrize("text", ["-470,1410", "-600,1500", "40.5,400", " -450 , 1500 "])
def test_window_text_round_trip(text):
    window = Window.parse(text)
    assert Window.parse(str(window)) == window
    assert Window.parse(str(DEFAULT_WINDOW)) == DEFAULT_WINDOW


@pytest.mark.parametrize("text", ["", "-450", "a,b", "-450,0", "-450,-10", "1,2,3", "nan,100"])
def test_bad_windows_are_one_line_errors(text):
    with pytest.raises(Cov3dError, match="window") as error:
        Window.parse(text)
    assert "\n" not in str(error.value)


def test_band_fractions_and_distance():
    grey = np.array([0, 39, 40, 99, 100, 159, 160, 219, 220, 255], dtype=np.uint8)
    np.testing.assert_allclose(band_fractions(grey), [0.2] * 5)
    np.testing.assert_allclose(band_fractions([grey[:2], grey[2:]]), [0.2] * 5)  # slices pooled
    assert band_distance(COV19_CT_DB_BANDS) == 0.0
    assert band_distance([1, 0, 0, 0, 0], [0, 0, 0, 0, 1]) == 2.0
    assert abs(sum(COV19_CT_DB_BANDS) - 1.0) < 1e-9


@pytest.mark.parametrize(("count", "expected"), [(1, [0]), (3, [0, 1, 2]), (4, [1, 2]), (30, list(range(7, 23)))])
def test_middle_half(count, expected):
    assert list(middle_half(count)) == expected
