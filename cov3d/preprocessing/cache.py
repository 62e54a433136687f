"""Storage format of the preprocessed-volume cache (used by ``cov3d.preprocessing.preprocess.VolumeCache``).

Layout: ``<cache_dir>/<D>x<H>x<W>[-fast][-warp<f>]/<scan folder name>-<key>.pt`` (the folder is the
``cov3d.settings.VolumeShape``'s ``folder_name``), one file per scan and shape, in an explicit
directory (``default_cache_dir``), never next to the data. ``key`` hashes the preprocessing
parameters (``VolumeShape.cache_params``: depth, height, width, fast_decode, the window, the warp
when there is one), ``CACHE_FORMAT_VERSION`` and the scan's resolved path. An entry (``make_entry``)
loads with ``torch.load(weights_only=True)``, is written atomically (``save_cache_entry``), is used
only while it is valid and current (``load_valid_volume``), and ``prune_cache`` removes what can
never be read again. docs/preprocessing.md describes the cache for users.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch

from cov3d.atomic import TEMP_SUFFIX, file_mode, leftover_temporaries, temporary_prefix, write_failure_reason
from cov3d.errors import Cov3dError, one_line
from cov3d.settings import SHAPE_FOLDER, VolumeShape

CACHE_FORMAT_VERSION = 4
"""Bump when the preprocessing or the entry layout changes: older entries are then rebuilt.
3: entries record the intensity window (DICOM/NIfTI grey levels changed to the calibrated default).
4: entries record the scan's domain measures (``cov3d.dataset.domain``)."""

CACHE_DIR_ENV = "COV3D_CACHE_DIR"
"""Environment variable that overrides the default cache directory."""

DEFAULT_CACHE_DIR = Path("~/.cache/cov3d")
"""Cache directory when ``COV3D_CACHE_DIR`` is not set (XDG-style user cache)."""

STORAGE_DTYPE = torch.uint8
"""dtype of the stored volumes (see the module docstring)."""

LEVELS = 255
"""Stored level of the value 1.0."""

STALE_TEMP_SECONDS = 3600
"""Age after which a leftover temporary file of an entry is taken to be from a killed writer."""

MAX_NAME_CHARS = 64
"""Longest scan-folder name kept in an entry's file name (the key keeps it unique)."""

KEY_HEX_CHARS = 16
"""Hex digits of the SHA-256 key in an entry's file name (64 bits)."""


def default_cache_dir() -> Path:
    """``$COV3D_CACHE_DIR`` if set, else ``~/.cache/cov3d`` (user directory expanded)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_DIR.expanduser()



def source_fingerprint(slices: Sequence[Path]) -> str:
    """SHA-256 (hex) of the name, size, modification and status-change times (ns) and inode
    number of every slice file.

    A slice replaced by another file of the same size and modification time (``cp`` then
    ``touch -d``, or a rename over it) still changes its status-change time (which only the
    kernel sets) or its inode. Reading the slices' contents instead would catch the same
    replacements at many times the cost (docs/benchmarks.md). A chmod or a new hard link also
    changes the status-change time; the scan is then rebuilt once, needlessly but correctly.
    """
    digest = hashlib.sha256()
    for path in slices:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise Cov3dError(
                f"Cannot read CT slice {path}: {one_line(error.strerror or error)}. "
                "Fix the file or leave the scan out."
            ) from None
        digest.update(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}\t{stat.st_ino}\n".encode())
    return digest.hexdigest()


def entry_path(cache_dir: Path, shape: VolumeShape, scan_dir: Path) -> Path:
    """Where the entry of ``scan_dir`` preprocessed to ``shape`` lives."""
    source = str(Path(scan_dir).resolve())
    keyed = json.dumps({**shape.cache_params, "format": CACHE_FORMAT_VERSION, "source": source}, sort_keys=True)
    key = hashlib.sha256(keyed.encode()).hexdigest()[:KEY_HEX_CHARS]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(source).name)[:MAX_NAME_CHARS] or "scan"
    return Path(cache_dir) / shape.folder_name / f"{name}-{key}.pt"


def checksum(volume: torch.Tensor) -> int:
    """CRC-32 of the bytes of a contiguous CPU tensor."""
    return zlib.crc32(volume.contiguous().numpy().view(dtype="uint8"))


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor allocated by numpy.

    numpy asks Linux for transparent huge pages on large arrays (``madvise``), so the first
    write of a large volume takes a few dozen page faults of 2 MB instead of thousands of 4 kB
    (docs/benchmarks.md).
    """
    numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.empty(shape, dtype=numpy_dtype))


def from_levels(levels: torch.Tensor) -> torch.Tensor:
    """Stored uint8 levels -> float32 values level / 255 in [0, 1], same shape.

    A value v in [0, 1] is stored as the level round(255 v): the 8-bit grid of the JPEG slices
    themselves, at most half a grey level (1/510) from it, a quarter of float32's size."""
    return empty_tensor(tuple(levels.shape), torch.float32).copy_(levels).div_(LEVELS)


def values_on(levels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stored uint8 levels -> float32 values level / 255 on ``device``, converted there (a
    quarter of the bytes cross to a GPU); the same values as ``from_levels``."""
    if levels.dtype != STORAGE_DTYPE:
        raise TypeError(f"expected stored {STORAGE_DTYPE} levels, got {levels.dtype}")
    if device.type == "cpu":
        return from_levels(levels)
    # Divide by a tensor on the device: CUDA multiplies by 1/255 when given a Python number,
    # which differs from the CPU's true division by one ulp for about half the levels.
    divisor = torch.full((), float(LEVELS), dtype=torch.float32, device=device)
    return levels.to(device, non_blocking=True).float().div_(divisor)


def make_entry(levels: torch.Tensor, shape: VolumeShape, scan_dir: Path, fingerprint: str,
               domain: dict | None = None) -> dict:
    """The dict stored for a volume of uint8 levels ``(1, D, H, W)``: the parameters, the source
    path, the source's ``fingerprint`` (``source_fingerprint``), the scan's ``domain`` measures
    (``cov3d.dataset.domain``: numbers, strings, ``None``), the volume and its CRC-32; only plain
    values and one tensor."""
    if levels.dtype != STORAGE_DTYPE:
        raise TypeError(f"cache entries store {STORAGE_DTYPE} levels, got {levels.dtype}")
    stored = levels.contiguous()
    return {
        **shape.cache_params,
        "format": CACHE_FORMAT_VERSION,
        "source": str(Path(scan_dir).resolve()),
        "fingerprint": fingerprint,
        "domain": dict(domain or {}),
        "volume": stored,
        "crc32": checksum(stored),
    }


def _remove_stale_temps(path: Path) -> None:
    """Delete leftover temporary files of ``path`` older than ``STALE_TEMP_SECONDS``."""
    now = time.time()
    for temp in leftover_temporaries(path):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                temp.unlink()
        except OSError:
            continue


def _without_zip_checksums() -> contextlib.AbstractContextManager:
    """Stop ``torch.save`` computing CRC-32s of its zip records where torch allows it (2.5+):
    ``torch.load`` never checks them, and the entry carries its own checksum of the volume."""
    try:
        from torch.utils.serialization import config

        config.save.compute_crc32  # noqa: B018 - only checks that this torch has the option
    except (ImportError, AttributeError):
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


def _temporary_beside(path: Path) -> IO[bytes]:
    """A new temporary file in ``path``'s folder, which is made (again) if missing: ``prune-cache``
    removes empty size folders, also one that a concurrent writer has just made."""
    def temporary() -> IO[bytes]:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=path.parent, prefix=temporary_prefix(path), suffix=TEMP_SUFFIX, delete=False)

    try:
        return temporary()
    except FileNotFoundError:
        return temporary()


def save_cache_entry(path: Path, entry: dict) -> None:
    """Write ``entry`` to ``path`` atomically (temporary file in the same folder, then
    ``os.replace``). Raises ``Cov3dError`` if the cache directory cannot be written.

    A reader never sees a half-written entry. A writer killed mid-write leaves only a ``.tmp``
    file, which is never read and which a later write of the same entry removes once it is
    ``STALE_TEMP_SECONDS`` old. There is no fsync (it would cost more than preprocessing at small):
    an entry torn by a system crash fails validation."""
    try:
        _remove_stale_temps(path)
        handle = _temporary_beside(path)
    except OSError as error:
        raise Cov3dError(
            f"Cannot write to cache directory {path.parent}: {one_line(error.strerror or error)}. "
            f"Choose another directory (e.g. with {CACHE_DIR_ENV})."
        ) from None
    temp = Path(handle.name)
    try:
        with handle, _without_zip_checksums():
            torch.save(entry, handle)
        os.chmod(temp, file_mode())  # NamedTemporaryFile makes it 0600: a shared cache must stay readable
        os.replace(temp, path)
    except BaseException as error:
        reason = write_failure_reason(error, path.parent) if isinstance(error, Exception) else None
        temp.unlink(missing_ok=True)
        if reason is not None:
            raise Cov3dError(
                f"Cannot write cache file {path}: {reason}. Free some space or choose another cache directory."
            ) from None
        raise


def load_valid_volume(
    path: Path, shape: VolumeShape, scan_dir: Path, fingerprint: str | None
) -> torch.Tensor | None:
    """The stored uint8 levels ``(1, D, H, W)`` of a valid, current entry (``load_valid_entry``), or ``None``."""
    entry = load_valid_entry(path, shape, scan_dir, fingerprint)
    return None if entry is None else entry["volume"]


def load_valid_entry(path: Path, shape: VolumeShape, scan_dir: Path, fingerprint: str | None) -> dict | None:
    """A valid, current entry (``make_entry``); ``None`` if the entry is missing, damaged or
    stale: truncated, unreadable, of another format version, shape, dtype, parameters, source or
    fingerprint, without its domain measures, or with a CRC-32 that does not match its volume.

    ``fingerprint=None`` skips the comparison with the source files, for an entry that was
    checked against them earlier in the same run; everything else is still checked.
    """
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a missing, unreadable or truncated entry counts as missing
        return None
    if not isinstance(entry, dict):
        return None
    expected = {
        **shape.cache_params,
        "format": CACHE_FORMAT_VERSION,
        "source": str(Path(scan_dir).resolve()),
    }
    if fingerprint is not None:
        expected["fingerprint"] = fingerprint
    if any(entry.get(name) != value for name, value in expected.items()):
        return None
    volume = entry.get("volume")
    if not isinstance(volume, torch.Tensor) or volume.dtype != STORAGE_DTYPE or tuple(volume.shape) != (1, *shape.dims):
        return None
    if entry.get("crc32") != checksum(volume) or not isinstance(entry.get("domain"), dict):
        return None
    return entry


@dataclass
class PruneSummary:
    """What ``prune_cache`` removed (file, reason), how many entries it kept and the bytes freed."""

    removed: list[tuple[Path, str]] = field(default_factory=list)
    kept: int = 0
    freed_bytes: int = 0


ENTRY_FILE = re.compile(rf"[A-Za-z0-9._-]+-[0-9a-f]{{{KEY_HEX_CHARS}}}\.pt")
"""Names of entry files (``entry_path``); temporary files are ``.<entry file>.<random>.tmp``."""


ZIP_RECORD = b"PK\x03\x04"
"""Start of a zip local file record: ``torch.save`` writes a zip archive."""
ENTRY_PICKLE_START = b"\x80\x02}"
"""``torch.save``'s pickle (protocol 2) of a dict."""
ENTRY_KEYS = (b"depth", b"format", b"source", b"fingerprint", b"volume")
"""Keys every entry's dict has had (format 1 and 2), as pickled short strings."""
ENTRY_HEADER_BYTES = 64 * 1024
"""Bytes read to recognise an entry: its first record holds the dict without the volume."""


def looks_like_entry(path: Path) -> bool:
    """Whether the file starts like a cov3d cache entry (also a truncated one): a ``torch.save``
    zip whose first record is ``<archive>/data.pkl``, stored, holding a pickled dict with the
    entry's keys, the first being ``depth``. Anything else (a pickle, a text file, another zip,
    an empty file) is not one, whatever its name."""
    with open(path, "rb") as handle:
        start = handle.read(ENTRY_HEADER_BYTES)
    if len(start) < 30 or not start.startswith(ZIP_RECORD):
        return False
    method, name_size, extra_size = struct.unpack("<H", start[8:10])[0], *struct.unpack("<HH", start[26:30])
    name = start[30:30 + name_size]
    record = start[30 + name_size + extra_size:]
    if method != 0 or not name.endswith(b"/data.pkl") or not record.startswith(ENTRY_PICKLE_START):
        return False
    keys = [b"X" + struct.pack("<I", len(key)) + key for key in ENTRY_KEYS]
    return record.find(keys[0]) == len(ENTRY_PICKLE_START) + 3 and all(key in record for key in keys)


def _prune_reason(path: Path, missing_scans: bool, now: float) -> str | None:
    """Why the file ``path`` of a size folder can go, or ``None`` to keep it.

    Only files named like cov3d's entries and their temporary files are considered, and of
    those only the ones whose first bytes prove them entries (``looks_like_entry``): anything
    else in the folder is kept, whatever its name.
    """
    if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX):
        if not ENTRY_FILE.fullmatch(path.name[1:].rsplit(".", 2)[0]):
            return None
        stale = now - path.stat().st_mtime > STALE_TEMP_SECONDS
        if not stale:  # being written now
            return None
        return "temporary file of a killed writer" if looks_like_entry(path) else None
    if not ENTRY_FILE.fullmatch(path.name) or not looks_like_entry(path):
        return None
    try:  # mmap: reads the small header records, not the volume
        entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a file that starts like an entry but cannot be read is a damaged entry
        return "damaged entry"
    if not isinstance(entry, dict) or "format" not in entry or "source" not in entry:
        return None
    if entry["format"] != CACHE_FORMAT_VERSION:
        return f"format {entry['format']}, this cov3d reads format {CACHE_FORMAT_VERSION}"
    if missing_scans and not Path(str(entry["source"])).exists():
        return "its scan is gone"
    return None


def prune_cache(cache_dir: Path, *, missing_scans: bool = False, dry_run: bool = False) -> PruneSummary:
    """Remove the entries under ``cache_dir`` that can never be read again.

    Only size folders and files named like entries whose first bytes prove them entries are
    looked at (a wrong ``cache_dir`` loses nothing else). Always: entries of another format
    version, damaged entries and
    temporary files older than ``STALE_TEMP_SECONDS``. With ``missing_scans``, also entries whose scan folder or file no
    longer exists (leave it off while a data drive is unmounted). With ``dry_run``, only report.
    Size folders left empty are removed. Raises ``Cov3dError`` if ``cache_dir`` is not a folder.
    """
    cache_dir = Path(cache_dir).expanduser()
    if not cache_dir.is_dir():
        raise Cov3dError(f"Cache directory not found: {cache_dir}. Give the folder passed as `cache_dir`.")
    summary, now = PruneSummary(), time.time()
    for folder in sorted(path for path in cache_dir.iterdir() if path.is_dir() and SHAPE_FOLDER.fullmatch(path.name)):
        try:
            paths = sorted(folder.iterdir())
        except FileNotFoundError:  # removed by a concurrent prune-cache
            continue
        for path in paths:
            try:
                reason = _prune_reason(path, missing_scans, now) if path.is_file() else None
                size = path.stat().st_size
            except FileNotFoundError:  # moved into place or removed by a concurrent writer
                continue
            if reason is None:
                if path.is_file() and ENTRY_FILE.fullmatch(path.name) and looks_like_entry(path):
                    summary.kept += 1
                continue
            if not dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:  # removed by a concurrent prune-cache
                    continue
                except OSError as error:
                    raise Cov3dError(
                        f"Cannot remove {path}: {one_line(error.strerror or error)}. Check the cache folder's permissions."
                    ) from None
            summary.removed.append((path, reason))
            summary.freed_bytes += size
        if not dry_run:
            with contextlib.suppress(OSError):  # a concurrent writer may just have filled it
                folder.rmdir()  # only an empty folder goes
    return summary
