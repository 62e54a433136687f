"""The grey-level reference of the ``out-of-distribution`` flag: the distance by hand, its record in a
config, and, on held-apart synthetic scans, that it keeps them and flags shifted ones."""

import numpy as np
import pytest
import torch
from PIL import Image

from cov3d.model.grey_reference import HISTOGRAM_BINS, STD_FLOOR, THRESHOLD_MARGIN, GreyReference, grey_histogram
from cov3d.preprocessing.preprocess import interpolate_depth, resize_slice
from cov3d.synthetic.phantom import render_phantom
from cov3d.window import DEFAULT_WINDOW, Window

SOFT_TISSUE_WINDOW = Window(40.0, 400.0)
"""A common abdomen window: JPEG stacks exported with it are not COV19-CT-DB's grey levels."""


def test_histogram_and_distance_by_hand():
    levels = torch.tensor([0, 15, 16, 255], dtype=torch.uint8)
    assert grey_histogram(levels).tolist() == [0.5, 0.25] + [0.0] * 13 + [0.25]
    first, second = np.zeros(HISTOGRAM_BINS), np.zeros(HISTOGRAM_BINS)
    first[0], second[0], second[1] = 1.0, 0.5, 0.5
    reference = GreyReference.fit([first, second])
    assert reference.mean[:2] == (0.75, 0.25) and reference.std[:2] == (0.25, 0.25)
    # Each training scan is 0.25 from the mean in bins 0 and 1: z = 0.25 / 0.26, squared twice over 16 bins.
    furthest = np.sqrt(2 * (0.25 / (0.25 + STD_FLOOR)) ** 2 / HISTOGRAM_BINS)
    assert reference.threshold == pytest.approx(furthest * THRESHOLD_MARGIN)
    assert reference.distance(first) == pytest.approx(furthest)
    assert GreyReference.from_config(reference.to_config()) == reference
    assert GreyReference.from_config(None) is None and GreyReference.from_config({"bins": 8}) is None


def levels(hu, window=DEFAULT_WINDOW):
    """A phantom preprocessed to 8 x 32 x 32 uint8 levels, as the cache stores it."""
    stack = np.stack([resize_slice(Image.fromarray(grey), 32, 32) for grey in window.to_uint8(hu)])
    return interpolate_depth(stack, 8, levels=True)


@pytest.fixture(scope="module")
def phantom_levels():
    """40 phantoms (half COVID-19, all severities): 30 to record, 10 held apart."""
    rng = np.random.default_rng(11)
    phantoms = [render_phantom(rng, depth=12, slice_size=64, has_covid=bool(i % 2), severity=1 + i % 4 if i % 2 else 0)
                for i in range(40)]
    return [(phantom.hu, levels(phantom.hu)) for phantom in phantoms]


def is_far(reference: GreyReference, volume: np.ndarray) -> bool:
    """Whether a scan lies beyond the reference's threshold, as ``cov3d.inference.flags`` decides it."""
    return reference.distance(grey_histogram(volume)) > reference.threshold


def test_held_apart_scans_pass_and_shifted_ones_are_flagged(phantom_levels):
    reference = GreyReference.fit(grey_histogram(volume) for _, volume in phantom_levels[:30])
    held = phantom_levels[30:]
    assert not any(is_far(reference, volume) for _, volume in held)
    shifted = {
        "soft-tissue window": [levels(hu, SOFT_TISSUE_WINDOW) for hu, _ in held],
        "inverted grey levels": [255 - volume for _, volume in held],
        "MR-like": [levels(np.clip(hu + 1000.0, 0, None)) for hu, _ in held],
    }
    for kind, volumes in shifted.items():
        assert all(is_far(reference, volume) for volume in volumes), kind
