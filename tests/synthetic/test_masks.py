"""A phantom's masks on the model's grid: resampled like the scan, thresholded at half a voxel."""

import numpy as np

from cov3d.synthetic.masks import resample_mask


def test_a_mask_keeps_its_place_on_the_model_grid():
    mask = np.zeros((6, 16, 16), dtype=bool)
    mask[:, :, :8] = True  # the left half of every slice
    resampled = resample_mask(mask, (3, 8, 4))
    assert resampled.shape == (3, 8, 4) and resampled.dtype == bool
    assert resampled[:, :, :2].all() and not resampled[:, :, 2:].any()
    assert resample_mask(np.ones((1, 4, 4), dtype=bool), (2, 2, 2)).all()  # one slice is repeated
