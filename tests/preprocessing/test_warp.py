"""The original code's cubic coordinate warp (``warp=0.5``) against an independent per-pixel route:
coordinates computed pixel by pixel from the formula, each pixel sampled on its own with
``scipy.ndimage.map_coordinates``, PIL's bicubic resize, then one ``CubicSpline`` per pixel along depth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.interpolate import CubicSpline
from scipy.ndimage import map_coordinates

from cov3d.errors import Cov3dError
from cov3d.preprocessing.cache import CACHE_FORMAT_VERSION, KEY_HEX_CHARS, prune_cache
from cov3d.preprocessing.preprocess import VolumeCache, depth_interpolation_matrix, preprocess_scan, warp_slice
from cov3d.settings import VolumeShape
from cov3d.window import DEFAULT_WINDOW

WARP = 0.5


def make_scan(folder: Path, n_slices: int, size: tuple[int, int] = (24, 20), seed: int = 0) -> Path:
    """A scan of n lossless slices of ``size`` (height, width): smooth patterns plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[0], : size[1]]
    for index in range(n_slices):
        pattern = 128 + 70 * np.sin(x / 3 + index) * np.cos(y / 4 - index) + rng.normal(0, 12, size)
        Image.fromarray(pattern.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.png").rename(folder / f"{index}.jpg")  # PNG data under the .jpg name: exact pixels
    return folder


def warped_position(index: int, count: int, factor: float) -> float:
    """u = -1 + 2 index / (count - 1), warped to f u^3 + (1 - f) u."""
    u = -1.0 + 2.0 * index / (count - 1)
    return factor * u**3 + (1.0 - factor) * u


def warped_slice_by_pixel(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Each output pixel sampled on its own at ((w(v) + 1) H0 / 2, (w(u) + 1) W0 / 2)."""
    height, width = pixels.shape
    out = np.empty_like(pixels)
    for row in range(height):
        y = (warped_position(row, height, factor) + 1.0) * height / 2
        for column in range(width):
            x = (warped_position(column, width, factor) + 1.0) * width / 2
            out[row, column] = map_coordinates(pixels, [[y], [x]])[0]
    return out


def warped_reference(scan: Path, depth: int, height: int, width: int, factor: float) -> np.ndarray:
    """(D, H, W) float64 by the per-pixel route (see the module docstring)."""
    names = sorted((p for p in scan.iterdir() if p.stem.isdigit()), key=lambda p: int(p.stem))
    stack = []
    for path in names:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        warped = Image.fromarray(warped_slice_by_pixel(pixels, factor))
        stack.append(np.asarray(warped.resize((width, height), Image.Resampling.BICUBIC)) / 255.0)
    stack = np.stack(stack)
    n = len(stack)
    positions = [-1.0 + 2.0 * k / (n - 1) for k in range(n)]
    targets = [warped_position(j, depth, factor) for j in range(depth)]
    volume = np.empty((depth, height, width))
    for row in range(height):
        for column in range(width):
            volume[:, row, column] = CubicSpline(positions, stack[:, row, column])(targets)
    return volume.clip(0.0, 1.0)


@pytest.mark.parametrize(("n_slices", "depth", "size"), [(2, 5, (12, 10)), (5, 7, (12, 10)), (9, 16, (8, 14))])
def test_warped_scan_matches_the_per_pixel_route(tmp_path: Path, n_slices: int, depth: int, size: tuple[int, int]) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", n_slices, size=(24, 20), seed=n_slices)
    volume = preprocess_scan(scan, depth, *size, warp=WARP)
    np.testing.assert_allclose(volume[0].numpy(), warped_reference(scan, depth, *size, WARP), atol=2e-6)
    assert not torch.allclose(volume, preprocess_scan(scan, depth, *size), atol=1e-2)


def test_warp_slice_is_sampled_at_the_original_coordinates() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    warped = warp_slice(pixels, WARP)
    assert warped.dtype == np.uint8 and warped.shape == pixels.shape
    np.testing.assert_array_equal(warped, warped_slice_by_pixel(pixels, WARP))
    # the centre of an odd slice maps to coordinate (0 + 1) * 9 / 2 = 4.5, between pixels 4 and 5 (not onto pixel 4)
    assert (warped_position(4, 9, WARP) + 1) * 9 / 2 == 4.5


def test_depth_matrix_of_two_slices_by_hand() -> None:
    # t = -1, -0.5, 0, 0.5, 1 -> 0.5 t^3 + 0.5 t = -1, -0.3125, 0, 0.3125, 1; a straight line through the two
    # slices at -1 and 1 weights the second by (w + 1) / 2
    second = np.array([0.0, 0.34375, 0.5, 0.65625, 1.0])
    np.testing.assert_allclose(depth_interpolation_matrix(2, 5, WARP), np.stack([1 - second, second], axis=1), atol=1e-12)
    np.testing.assert_array_equal(depth_interpolation_matrix(7, 9, 0.0), depth_interpolation_matrix(7, 9))


def test_no_warp_is_the_paper_route(tmp_path: Path) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 4)
    assert torch.equal(preprocess_scan(scan, 6, 12, 10, warp=0.0), preprocess_scan(scan, 6, 12, 10))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0, float("nan")])
def test_invalid_warp(tmp_path: Path, bad: float) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 2)
    with pytest.raises(Cov3dError, match="warp"):
        preprocess_scan(scan, 4, 8, 8, warp=bad)
    with pytest.raises(Cov3dError, match="warp"):
        VolumeCache(tmp_path / "cache", VolumeShape(4, 8, 8, warp=bad))


def test_warped_volumes_are_cached_under_their_own_key(tmp_path: Path) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 4)
    cache_dir = tmp_path / "cache"
    plain, warped = VolumeCache(cache_dir, VolumeShape(6, 12, 10)), VolumeCache(cache_dir, VolumeShape(6, 12, 10, warp=WARP))
    assert plain.path_for(scan) != warped.path_for(scan)
    assert warped.path_for(scan).parent.name == "6x12x10-warp0.5"
    # the unwarped volume's key has no warp in it: the key it had before the warp option existed
    old_params = {"depth": 6, "height": 12, "width": 10, "fast_decode": 0, "window": str(DEFAULT_WINDOW)}
    keyed = json.dumps({**old_params, "format": CACHE_FORMAT_VERSION, "source": str(scan.resolve())}, sort_keys=True)
    assert plain.path_for(scan).name == f"ct_scan_1-{hashlib.sha256(keyed.encode()).hexdigest()[:KEY_HEX_CHARS]}.pt"
    got = warped.get(scan)
    assert torch.allclose(got, preprocess_scan(scan, 6, 12, 10, warp=WARP), atol=0.5 / 255 + 1e-6)
    assert plain.load(scan) is None  # the warped entry is not taken for the plain one
    assert torch.equal(warped.load(scan), got)
    # prune-cache recognises the warped size folder and keeps its current entry
    assert prune_cache(cache_dir).kept == 1


@pytest.mark.slow
def test_warped_training_run_records_the_warp(tmp_path: Path, tiny_dataset: Path) -> None:
    """A run trained with a warp records it, and inference preprocesses with it (cache under its key)."""
    from cov3d.inference.infer import infer
    from cov3d.training.train import TrainSettings, train

    settings = TrainSettings(shape=VolumeShape(4, 16, 16, warp=WARP), epochs=1, penultimate=8)
    run = train(tiny_dataset, tmp_path / "run", settings, cache_dir=tmp_path / "cache", pretrained=False,
                device="cpu", precision="fp32", workers=1).run_dir
    assert json.loads((run / "config.json").read_text())["warp"] == WARP
    scans = sorted((tiny_dataset / "test").iterdir())[:1]
    infer(scans, run, tmp_path / "preds.csv", cache_dir=tmp_path / "cache", device="cpu", precision="fp32",
          progress=False)
    assert {folder.name for folder in (tmp_path / "cache").iterdir()} == {"4x16x16-warp0.5"}
