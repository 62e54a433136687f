"""Tests for cov3d.preprocessing.preprocess and cov3d.preprocessing.cache against an independent route: PIL bicubic resize
of each slice plus scipy ``CubicSpline`` evaluated pixel by pixel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.interpolate import CubicSpline

from cov3d.errors import Cov3dError
from cov3d.preprocessing import cache as cache_module, preprocess as preprocess_module
from cov3d.preprocessing.preprocess import (
    VolumeCache,
    default_cache_dir,
    depth_interpolation_matrix,
    interpolate_depth,
    preprocess_scan,
)
from cov3d.preprocessing.workers import PreprocessSummary, preprocess_many, select_shard
from cov3d.settings import PRESETS, VolumeShape

STORAGE_TOLERANCE = 2e-3
"""Required bound on |cached volume - reference| after storage rounding (issue #4)."""

LEVEL_ROUNDING = 0.5 / 255
"""Largest change from rounding a value in [0, 1] to the nearest uint8 level / 255."""


def textured(rng: np.random.Generator, height: int, width: int, phase: float) -> np.ndarray:
    """A smooth pattern plus noise, uint8 (height, width): not constant, JPEG-friendly."""
    y, x = np.mgrid[:height, :width]
    pattern = 128 + 70 * np.sin(x / 3 + phase) * np.cos(y / 4 - phase) + rng.normal(0, 12, (height, width))
    return pattern.clip(0, 255).astype(np.uint8)


def make_scan(folder: Path, n_slices: int, size: tuple[int, int] = (24, 20), seed: int = 0) -> Path:
    """A scan of n JPEG slices of ``size`` (height, width) with varied content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(n_slices):
        Image.fromarray(textured(rng, *size, phase=index * 0.7)).save(folder / f"{index}.jpg", quality=90)
    return folder


def reference_volume(scan: Path, depth: int, height: int, width: int) -> np.ndarray:
    """(D, H, W) float64: PIL bicubic resize of each slice, then one CubicSpline per pixel."""
    names = sorted((path for path in scan.iterdir() if path.stem.isdigit()), key=lambda path: int(path.stem))
    stack = []
    for path in names:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16-bit: scaled by 255 / 65535 (documented in cov3d.dataset.scans)
                image = Image.fromarray(np.rint(np.asarray(image) * (255 / 65535)).astype(np.uint8))
            grey = image.convert("L").resize((width, height), Image.Resampling.BICUBIC)
            stack.append(np.asarray(grey) / 255.0)
    stack = np.stack(stack)
    if len(stack) == 1:
        return np.repeat(stack, depth, axis=0)
    positions, targets = np.linspace(0, 1, len(stack)), np.linspace(0, 1, depth)
    volume = np.empty((depth, height, width))
    for row in range(height):
        for column in range(width):
            volume[:, row, column] = CubicSpline(positions, stack[:, row, column])(targets)
    return volume.clip(0.0, 1.0)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_sizes_match_paper() -> None:
    assert {name: shape.dims for name, shape in PRESETS.items()} == {
        "small": (64, 128, 128), "medium": (128, 256, 256), "large": (160, 320, 320)}


@pytest.mark.parametrize("n_slices", [1, 2, 3, 4, 7, 12])
@pytest.mark.parametrize("depth", [1, 5, 16])
def test_preprocess_scan_matches_per_pixel_cubic_spline(tmp_path: Path, n_slices: int, depth: int) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", n_slices, seed=n_slices)
    volume = preprocess_scan(scan, depth, 12, 10)
    assert volume.shape == (1, depth, 12, 10)
    assert volume.dtype == torch.float32
    np.testing.assert_allclose(volume[0].numpy(), reference_volume(scan, depth, 12, 10), atol=2e-6)


def test_two_and_three_slices_by_hand() -> None:
    """2 points: a straight line; 3 points: the parabola through them (not-a-knot)."""
    np.testing.assert_allclose(depth_interpolation_matrix(2, 5), [[1, 0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0, 1]])
    # parabola through (0, a), (1/2, b), (1, c) at t = 1/4: (3a + 6b - c) / 8
    np.testing.assert_allclose(depth_interpolation_matrix(3, 5)[1], [3 / 8, 6 / 8, -1 / 8], atol=1e-12)
    np.testing.assert_allclose(depth_interpolation_matrix(1, 3), [[1], [1], [1]])
    rows = depth_interpolation_matrix(40, 160)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)  # constants are reproduced


def test_numeric_slice_order(tmp_path: Path) -> None:
    """Slice k holds grey level 20 k (lossless data); with D = n the output is the input."""
    scan = tmp_path / "ct_scan_5"
    scan.mkdir()
    for index in range(12):
        Image.fromarray(np.full((8, 8), 20 * index, dtype=np.uint8)).save(scan / f"{index}.jpg", format="PNG")
    volume = preprocess_scan(scan, 12, 4, 4)
    np.testing.assert_allclose(volume[0, :, 0, 0].numpy(), np.arange(12) * 20 / 255, atol=1e-6)


def test_values_clipped_to_unit_range(tmp_path: Path) -> None:
    """Alternating black and white slices make the spline overshoot; the output is clipped."""
    scan = tmp_path / "ct_scan_1"
    scan.mkdir()
    for index in range(6):
        Image.fromarray(np.full((8, 8), 255 * (index % 2), dtype=np.uint8)).save(scan / f"{index}.jpg", format="PNG")
    volume = preprocess_scan(scan, 23, 4, 4)
    assert float(volume.min()) == 0.0 and float(volume.max()) == 1.0
    spline = CubicSpline(np.linspace(0, 1, 6), np.arange(6) % 2)(np.linspace(0, 1, 23))
    assert spline.min() < -0.05 and spline.max() > 1.05
    np.testing.assert_allclose(volume[0, :, 0, 0].numpy(), spline.clip(0, 1), atol=1e-6)


def test_large_stack_long_scan(tmp_path: Path) -> None:
    """Many slices exercise the banded, column-blocked product (tiny slices keep it fast)."""
    scan = make_scan(tmp_path / "ct_scan_9", 150, size=(6, 5))
    volume = preprocess_scan(scan, 40, 6, 5)
    np.testing.assert_allclose(volume[0].numpy(), reference_volume(scan, 40, 6, 5), atol=2e-6)


@pytest.mark.parametrize(("n_slices", "depth"), [(1, 4), (2, 9), (7, 16), (40, 11), (300, 64), (120, 160)])
def test_interpolate_depth_floats_and_levels(n_slices: int, depth: int) -> None:
    """Both outputs against per-pixel splines on random stacks with black/white jumps (overshoot)."""
    rng = np.random.default_rng(n_slices)
    stack = rng.integers(0, 256, (n_slices, 3, 4), dtype=np.uint8)
    stack[::2, 0, 0], stack[1::2, 0, 0] = 0, 255
    if n_slices == 1:
        expected = np.repeat(stack / 255.0, depth, axis=0)
    else:
        positions, targets = np.linspace(0, 1, n_slices), np.linspace(0, 1, depth)
        expected = CubicSpline(positions, stack / 255.0, axis=0)(targets).clip(0.0, 1.0)
    floats = preprocess_module.interpolate_depth(stack, depth)
    assert floats.shape == (1, depth, 3, 4) and floats.dtype == torch.float32
    np.testing.assert_allclose(floats[0].numpy(), expected, atol=2e-6)
    levels = preprocess_module.interpolate_depth(stack, depth, levels=True)
    assert levels.shape == (1, depth, 3, 4) and levels.dtype == torch.uint8
    assert np.abs(levels[0].numpy() - expected * 255).max() <= 0.5 + 1e-3
    assert np.abs(levels[0].numpy() / 255 - expected).max() <= STORAGE_TOLERANCE
    if n_slices > 2:
        assert {0, 255} <= set(levels[0, :, 0, 0].tolist())  # overshoot clipped to the ends


def test_messy_slices_are_converted(tmp_path: Path) -> None:
    """Mixed sizes, RGB and 16-bit slices, and stray files give the reference result."""
    scan = tmp_path / "ct_scan7"
    make_scan(scan, 4, size=(24, 20))
    rng = np.random.default_rng(3)
    Image.fromarray(textured(rng, 40, 36, 1.0)).save(scan / "4.jpg")
    rgb = np.stack([textured(rng, 24, 20, 2.0)] * 3, axis=-1)
    Image.fromarray(rgb).save(scan / "5.jpg")
    sixteen = textured(rng, 24, 20, 3.0).astype(np.uint16) * 257
    Image.fromarray(sixteen).save(scan / "6.jpg", format="PNG")
    for name in (".7.jpg", "._1.jpg", "notes.txt", "8a.jpg"):
        (scan / name).write_bytes(b"junk")
    volume = preprocess_scan(scan, 9, 12, 10)
    np.testing.assert_allclose(volume[0].numpy(), reference_volume(scan, 9, 12, 10), atol=2e-6)
    clean = tmp_path / "clean"
    clean.mkdir()
    for index in range(7):
        (scan / f"{index}.jpg").rename(clean / f"{index}.jpg")
    assert torch.equal(preprocess_scan(clean, 9, 12, 10), volume)


@pytest.mark.parametrize("bad", ["corrupt", "empty-file", "empty-folder"])
def test_bad_scans_raise_one_line(tmp_path: Path, bad: str) -> None:
    scan = tmp_path / "ct_scan_4"
    scan.mkdir()
    culprit = scan
    if bad != "empty-folder":
        make_scan(scan, 3)
        culprit = scan / "1.jpg"
        culprit.write_bytes(b"" if bad == "empty-file" else b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(Cov3dError) as error:
        preprocess_scan(scan, 4, 8, 8)
    assert str(culprit) in str(error.value) and "\n" not in str(error.value)


def test_fast_decode_close_to_normal(tmp_path: Path) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 6, size=(64, 64))
    normal = preprocess_scan(scan, 6, 16, 16)
    fast = preprocess_scan(scan, 6, 16, 16, fast_decode=True)
    difference = (normal - fast).abs()
    assert 0 < float(difference.max()) < 0.05
    assert float(difference.mean()) < 0.01
    # no power-of-two reduction reaches 40 x 40 from 64 x 64: identical to the normal path
    assert torch.equal(preprocess_scan(scan, 6, 40, 40), preprocess_scan(scan, 6, 40, 40, fast_decode=True))


def test_invalid_sizes(tmp_path: Path) -> None:
    with pytest.raises(Cov3dError, match="positive"):
        preprocess_scan(make_scan(tmp_path / "s", 2), 0, 8, 8)
    with pytest.raises(Cov3dError, match="height"):  # the shape checks its sizes before any cache is made
        VolumeCache(tmp_path, VolumeShape(4, 0, 8))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COV3D_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("COV3D_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "cov3d"


def test_cache_paths_keyed_by_parameters_and_source(tmp_path: Path, cache_dir: Path) -> None:
    scan_a, scan_b = make_scan(tmp_path / "a" / "ct_scan_1", 2), make_scan(tmp_path / "b" / "ct_scan_1", 2)
    small = VolumeCache(cache_dir, VolumeShape(4, 8, 8))
    paths = {
        small.path_for(scan_a),
        small.path_for(scan_b),
        VolumeCache(cache_dir, VolumeShape(5, 8, 8)).path_for(scan_a),
        VolumeCache(cache_dir, VolumeShape(4, 8, 8, fast_decode=True)).path_for(scan_a),
    }
    assert len(paths) == 4
    assert all(path.is_relative_to(cache_dir) for path in paths)
    assert small.path_for(Path(os.path.relpath(scan_a))) == small.path_for(scan_a)


def test_cache_round_trip_within_storage_tolerance(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 5)
    cache = VolumeCache(cache_dir, VolumeShape(7, 12, 10))
    before = sorted(tmp_path.rglob("*"))
    assert cache.load(scan) is None
    built = cache.get(scan)
    assert cache.path_for(scan).is_file()
    assert [path for path in sorted(tmp_path.rglob("*")) if not path.is_relative_to(cache_dir)] == before
    error = float((built[0].numpy() - reference_volume(scan, 7, 12, 10)).__abs__().max())
    assert error <= LEVEL_ROUNDING + 2e-6 <= STORAGE_TOLERANCE
    entry = torch.load(cache.path_for(scan), weights_only=True)
    assert entry["volume"].dtype == torch.uint8
    assert torch.equal(entry["volume"].float() / 255, built)  # stored levels / 255, exactly
    levels_error = (entry["volume"].float() - preprocess_scan(scan, 7, 12, 10) * 255).abs().max()
    assert float(levels_error) <= 0.5 + 1e-3  # the nearest level of the float32 volume
    monkeypatch.setattr(preprocess_module, "_preprocess_slices", lambda *args, **kwargs: pytest.fail("rebuilt"))
    assert torch.equal(cache.get(scan), built)
    assert torch.equal(cache.load(scan), built)


def damage(path: Path, how: str) -> None:
    """Damage a cache entry in one of several ways."""
    entry = torch.load(path, weights_only=True)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "shape":
        torch.save({**entry, "volume": entry["volume"][:, :-1]}, path)
    elif how == "dtype":
        torch.save({**entry, "volume": entry["volume"].float()}, path)
    elif how == "contents":
        torch.save({**entry, "volume": entry["volume"] // 2}, path)
    elif how == "version":
        torch.save({**entry, "format": entry["format"] + 1}, path)
    elif how == "not-a-dict":
        torch.save(entry["volume"], path)
    elif how == "directory":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize(
    "how", ["truncated", "garbage", "empty", "shape", "dtype", "contents", "version", "not-a-dict", "directory"]
)
def test_damaged_cache_is_rebuilt(tmp_path: Path, cache_dir: Path, how: str) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 3)
    cache = VolumeCache(cache_dir, VolumeShape(4, 8, 6))
    good = cache.get(scan)
    damage(cache.path_for(scan), how)
    assert cache.load(scan) is None
    if how == "directory":
        with pytest.raises(Cov3dError, match="Cannot write cache file"):
            cache.get(scan)
        return
    assert torch.equal(cache.get(scan), good)
    assert torch.equal(cache.load(scan), good)


def test_checked_levels_read_without_listing_the_scan(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training reads entries that update() made current without listing or fingerprinting the scan again."""
    scan = make_scan(tmp_path / "ct_scan_1", 3)
    cache = VolumeCache(cache_dir, VolumeShape(4, 8, 6))
    cache.update(scan)
    values = cache.get(scan)
    listings = []
    real_sources = preprocess_module.scan_sources
    monkeypatch.setattr(preprocess_module, "scan_sources", lambda folder: listings.append(folder) or real_sources(folder))
    levels = cache.checked_levels(scan)
    assert listings == []
    assert levels.dtype == torch.uint8 and levels.shape == (1, 4, 8, 6)
    assert torch.equal(levels.float() / 255, values)


@pytest.mark.parametrize("how", ["truncated", "contents", "missing"])
def test_checked_levels_rebuild_a_damaged_or_missing_entry(tmp_path: Path, cache_dir: Path, how: str) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 3)
    cache = VolumeCache(cache_dir, VolumeShape(4, 8, 6))
    cache.update(scan)
    good = cache.checked_levels(scan)
    if how == "missing":
        cache.path_for(scan).unlink()
    else:
        damage(cache.path_for(scan), how)
    assert torch.equal(cache.checked_levels(scan), good)
    assert cache.load(scan) is not None  # stored again


def test_source_change_rebuilds(tmp_path: Path, cache_dir: Path) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 3)
    cache = VolumeCache(cache_dir, VolumeShape(4, 8, 6))
    first = cache.get(scan)
    stat = (scan / "1.jpg").stat()
    os.utime(scan / "1.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    assert cache.load(scan) is None
    assert preprocess_many([scan], cache, workers=1, progress=False).processed == 1
    assert torch.equal(cache.load(scan), first)
    Image.fromarray(np.zeros((24, 20), dtype=np.uint8)).save(scan / "1.jpg")  # replaced
    assert cache.load(scan) is None
    changed = cache.get(scan)
    assert not torch.equal(changed, first)
    assert float((changed[0].numpy() - reference_volume(scan, 4, 8, 6)).__abs__().max()) <= STORAGE_TOLERANCE
    Image.fromarray(np.zeros((24, 20), dtype=np.uint8)).save(scan / "3.jpg")  # added
    assert cache.load(scan) is None


def test_leftover_temp_file_is_ignored_and_stale_ones_removed(tmp_path: Path, cache_dir: Path) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 3)
    cache = VolumeCache(cache_dir, VolumeShape(4, 8, 6))
    path = cache.path_for(scan)
    path.parent.mkdir(parents=True)
    # named as the cache's writers name them: 8 random characters (tempfile's)
    fresh, stale = (path.parent / f".{path.name}.{random}{cache_module.TEMP_SUFFIX}" for random in ("a1b2c3d4", "e5_6g7h8"))
    for temp in (fresh, stale):
        temp.write_bytes(b"half-written")
    old = time.time() - 2 * cache_module.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    assert cache.load(scan) is None
    volume = cache.get(scan)
    assert torch.equal(cache.load(scan), volume)
    assert fresh.exists() and not stale.exists()


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from cov3d.preprocessing import cache as cache_module
    from cov3d.preprocessing.preprocess import VolumeCache
    from cov3d.settings import VolumeShape

    real_save = torch.save

    def slow_save(entry, handle):
        real_save(entry, handle)
        handle.truncate(handle.tell() // 2)
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)

    cache_module.torch.save = slow_save
    VolumeCache(Path(sys.argv[1]), VolumeShape(4, 8, 6)).get(Path(sys.argv[2]))
    """
)


def test_writer_killed_mid_write(tmp_path: Path, cache_dir: Path) -> None:
    """A real process killed with SIGKILL while writing leaves no loadable entry behind."""
    scan = make_scan(tmp_path / "ct_scan_1", 3)
    cache = VolumeCache(cache_dir, VolumeShape(4, 8, 6))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(cache_dir), str(scan)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    path = cache.path_for(scan)
    assert not path.exists()
    assert [temp.suffix for temp in path.parent.iterdir()] == [cache_module.TEMP_SUFFIX]
    assert cache.load(scan) is None
    volume = cache.get(scan)
    assert float((volume[0].numpy() - reference_volume(scan, 4, 8, 6)).__abs__().max()) <= STORAGE_TOLERANCE


def make_scans(root: Path, count: int) -> list[Path]:
    return [make_scan(root / f"ct_scan_{index}", 2 + index % 3, size=(10, 8), seed=index) for index in range(count)]


def test_full_disk_fails_each_scan_with_its_cache_file_named(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save reports a full disk as RuntimeError ('unexpected pos'); cov3d says what happened."""
    from cov3d import atomic

    def torn_save(entry: dict, handle) -> None:
        handle.write(b"PK\x03\x04 torn")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    scans = make_scans(tmp_path / "data", 2)
    cache = VolumeCache(cache_dir, VolumeShape(4, 6, 6))
    monkeypatch.setattr(cache_module.torch, "save", torn_save)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 0})())
    summary = preprocess_many(scans, cache, workers=1, progress=False)
    assert [path for path, _ in summary.failed] == scans
    for scan, (_, reason) in zip(scans, summary.failed):
        assert reason == (
            f"Cannot write cache file {cache.path_for(scan)}: No space left on device. "
            "Free some space or choose another cache directory."
        )
    assert list(cache_dir.rglob("*")) == [cache.path_for(scans[0]).parent]  # no entry, no temporary file


def test_resume_skips_up_to_date(tmp_path: Path, cache_dir: Path) -> None:
    scans = make_scans(tmp_path / "data", 4)
    cache = VolumeCache(cache_dir, VolumeShape(4, 6, 6))
    first = preprocess_many(scans, cache, workers=1, progress=True)
    assert (first.processed, first.skipped, first.failed) == (4, 0, [])
    second = preprocess_many(scans, cache, workers=1, progress=False)
    assert (second.processed, second.skipped, second.failed) == (0, 4, [])
    assert second.total == 4


def test_failures_do_not_stop_others_unless_strict(tmp_path: Path, cache_dir: Path) -> None:
    scans = make_scans(tmp_path / "data", 4)
    (scans[1] / "0.jpg").write_bytes(b"")
    empty = tmp_path / "data" / "ct_scan_9"
    empty.mkdir()
    cache = VolumeCache(cache_dir, VolumeShape(4, 6, 6))
    summary = preprocess_many([*scans, empty], cache, workers=1, progress=False)
    assert (summary.processed, summary.skipped) == (3, 0)
    assert [path for path, _ in summary.failed] == [scans[1], empty]
    assert str(scans[1] / "0.jpg") in summary.failed[0][1] and "empty" in summary.failed[0][1]
    assert "No CT slices" in summary.failed[1][1]
    with pytest.raises(Cov3dError, match="0.jpg"):
        preprocess_many(scans, VolumeCache(cache_dir, VolumeShape(5, 6, 6)), workers=1, strict=True, progress=False)


def test_unexpected_errors_are_reported(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scans = make_scans(tmp_path / "data", 2)

    def broken(*args: object, **kwargs: object) -> None:
        raise MemoryError("no room")

    monkeypatch.setattr(preprocess_module, "_preprocess_slices", broken)
    summary = preprocess_many(scans, VolumeCache(cache_dir, VolumeShape(4, 6, 6)), workers=1, progress=False)
    assert len(summary.failed) == 2 and "MemoryError" in summary.failed[0][1]


def test_two_workers_match_one(tmp_path: Path, cache_dir: Path) -> None:
    scans = make_scans(tmp_path / "data", 5)
    (scans[2] / "1.jpg").write_bytes(b"broken")
    parallel = VolumeCache(cache_dir / "two", VolumeShape(4, 6, 6))
    summary = preprocess_many(scans, parallel, workers=2, progress=False)
    assert (summary.processed, summary.skipped, [path for path, _ in summary.failed]) == (4, 0, [scans[2]])
    serial = VolumeCache(cache_dir / "one", VolumeShape(4, 6, 6))
    for scan in (scans[0], scans[4]):
        assert torch.equal(parallel.load(scan), serial.get(scan))


def test_shards_partition_the_scans(tmp_path: Path, cache_dir: Path) -> None:
    scans = make_scans(tmp_path / "data", 7)
    shards = [select_shard(list(reversed(scans)), (index, 3)) for index in range(3)]
    assert sorted(path for shard in shards for path in shard) == sorted(scans)
    assert sum(len(shard) for shard in shards) == len(scans)
    assert shards == [select_shard(scans, (index, 3)) for index in range(3)]  # order-independent
    cache = VolumeCache(cache_dir, VolumeShape(4, 6, 6))
    summary = preprocess_many(scans, cache, workers=1, shard=(1, 3), progress=False)
    assert summary == PreprocessSummary(processed=len(shards[1]))
    assert {scan for scan in scans if cache.path_for(scan).exists()} == set(shards[1])
    for bad in [(3, 3), (-1, 2), (0, 0)]:
        with pytest.raises(Cov3dError, match="shard"):
            select_shard(scans, bad)


def test_prune_removes_only_what_can_never_be_read(tmp_path: Path, cache_dir: Path) -> None:
    kept_scan, gone_scan = make_scan(tmp_path / "ct_scan_1", 3), make_scan(tmp_path / "ct_scan_2", 3, seed=1)
    cache, other_size = VolumeCache(cache_dir, VolumeShape(4, 8, 6)), VolumeCache(cache_dir, VolumeShape(2, 4, 4))
    for scan in (kept_scan, gone_scan):
        cache.update(scan)
    other_size.update(gone_scan)
    entry = torch.load(cache.path_for(kept_scan), weights_only=True)
    folder = cache.path_for(kept_scan).parent
    torch.save({**entry, "format": 1, "volume": entry["volume"].half() / 255}, folder / "ct_scan_1-0123456789abcdef.pt")
    complete = cache.path_for(kept_scan).read_bytes()
    (folder / "ct_scan_3-fedcba9876543210.pt").write_bytes(complete[:-64])  # a torn entry
    old_temp = folder / f".{cache.path_for(kept_scan).name}.k2j4x9.tmp"
    new_temp = folder / f".{cache.path_for(kept_scan).name}.p7q1z3.tmp"
    foreign_temp = folder / ".notes.tmp"
    for temp in (old_temp, new_temp):
        temp.write_bytes(complete[:-64])
    foreign_temp.write_bytes(b"half")
    for temp in (old_temp, foreign_temp):
        os.utime(temp, (time.time() - 2 * cache_module.STALE_TEMP_SECONDS,) * 2)
    # Not cov3d's, so never touched, even in a size folder: a wrong --cache-dir loses nothing.
    (folder / "notes.txt").write_text("the user's")
    torch.save(torch.zeros(2), folder / "weights.pt")
    torch.save({"weight": torch.zeros(2)}, folder / "resnet-0123456789abcdef.pt")
    (folder / "ct_scan_5-0123456789abcdef.pt").write_bytes(b"not a zip")  # named like an entry, but not one
    (cache_dir / "models").mkdir()
    (cache_dir / "models" / "ct_scan_4-0123456789abcdef.pt").write_bytes(b"not a zip")
    foreign = [folder / "notes.txt", folder / "weights.pt", folder / "resnet-0123456789abcdef.pt", foreign_temp,
               folder / "ct_scan_5-0123456789abcdef.pt",
               cache_dir / "models" / "ct_scan_4-0123456789abcdef.pt"]
    for path in gone_scan.iterdir():
        path.unlink()
    gone_scan.rmdir()

    preview = cache_module.prune_cache(cache_dir, dry_run=True)
    assert {path.name for path, _ in preview.removed} == {
        "ct_scan_1-0123456789abcdef.pt", "ct_scan_3-fedcba9876543210.pt", old_temp.name,
    }
    assert all(path.exists() for path, _ in preview.removed)
    reasons = dict((path.name, reason) for path, reason in preview.removed)
    assert reasons["ct_scan_1-0123456789abcdef.pt"].startswith("format 1")
    assert reasons["ct_scan_3-fedcba9876543210.pt"] == "damaged entry"

    pruned = cache_module.prune_cache(cache_dir)
    assert [path for path, _ in pruned.removed] == [path for path, _ in preview.removed]
    assert not any(path.exists() for path, _ in pruned.removed)
    assert pruned.kept == 3 and new_temp.exists() and all(path.exists() for path in foreign)
    assert pruned.freed_bytes > 0
    assert cache.load(kept_scan) is not None

    gone = cache_module.prune_cache(cache_dir, missing_scans=True)
    assert sorted(reason for _, reason in gone.removed) == ["its scan is gone"] * 2
    assert gone.kept == 1 and cache.load(kept_scan) is not None and all(path.exists() for path in foreign)
    assert not other_size.path_for(kept_scan).parent.exists()  # its only entry went: folder removed


def test_prune_a_missing_cache_dir(tmp_path: Path) -> None:
    with pytest.raises(Cov3dError, match="Cache directory not found: .*nowhere"):
        cache_module.prune_cache(tmp_path / "nowhere")


def test_values_on_a_device_are_the_stored_values(tmp_path: Path, cache_dir: Path) -> None:
    scan = make_scan(tmp_path / "ct_scan_1", 3)
    cache = VolumeCache(cache_dir, VolumeShape(4, 8, 6))
    levels = cache.levels(scan)
    assert levels.dtype == torch.uint8
    assert torch.equal(cache_module.values_on(levels, torch.device("cpu")), cache.get(scan))
    assert torch.equal(cache.get(scan), levels.double().div(255).float())  # independent route: float64, rounded
    with pytest.raises(TypeError, match="uint8"):
        cache_module.values_on(cache.get(scan), torch.device("cpu"))  # values are not divided twice


def test_clipping_removes_only_the_splines_overshoot_of_a_step_in_depth() -> None:
    """A step from 0 to 255 half way through 10 slices, interpolated to 64: scipy's spline (an
    independent route) overshoots to about -0.107 and 1.107, which float storage (the original code)
    kept; cov3d stores round(255 clip(v, 0, 1)), so it differs from the spline by the overshoot there
    and by at most half a level (1/510) everywhere else."""
    stack = np.zeros((10, 1, 1), dtype=np.uint8)
    stack[5:] = 255
    spline = CubicSpline(np.linspace(0, 1, 10), stack[:, 0, 0] / 255.0)(np.linspace(0, 1, 64))
    assert spline.min() == pytest.approx(-0.1067, abs=1e-4) and spline.max() == pytest.approx(1.1067, abs=1e-4)
    stored = interpolate_depth(stack, 64, levels=True).numpy().reshape(64) / 255.0
    inside = (spline >= 0) & (spline <= 1)
    assert np.abs(stored - spline)[inside].max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(stored[~inside], np.where(spline[~inside] < 0, 0.0, 1.0))
    assert 0 < (~inside).sum() < 64
