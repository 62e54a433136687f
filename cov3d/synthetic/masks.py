"""A phantom's masks (``cov3d.synthetic.generator.read_masks``) on a model's input grid, resampled as
the preprocessing resamples the scan itself, so that a map over the model's input can be checked
against the truth the phantom knows."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cov3d.preprocessing.preprocess import depth_interpolation_matrix

MASK_THRESHOLD = 0.5
"""A model voxel belongs to a mask when at least half of it does (after resampling)."""


def resample_mask(mask: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """A (n, S, S) bool mask on the model's (D, H, W) grid: bilinear in-plane, the preprocessing's
    cubic spline along depth, thresholded at ``MASK_THRESHOLD``."""
    depth, height, width = size
    planes = np.stack([
        np.asarray(Image.fromarray(plane.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
        for plane in mask
    ])
    stacked = depth_interpolation_matrix(len(planes), depth) @ planes.reshape(len(planes), -1)
    return stacked.reshape(depth, height, width) >= MASK_THRESHOLD
