"""Writing files so that a kill, a crash or a full disk never leaves a half-written one.

A file is written to a temporary name beside its final path, flushed to disk and renamed over
the path (``os.replace``), so the path always holds the old or the new file. When writing fails
the temporary file is removed and the reason is given in words. Writes done by Python report a
full disk as ``OSError``; ``torch.save`` reports it as ``RuntimeError`` ("unexpected pos ...")
after filling the disk, so a failed write into a folder whose disk has (almost) no space left is
reported as a full disk. (safetensors' ``save_file`` gives a ``SafetensorError`` without
touching the disk, so safetensors data is serialised in memory and written with
``write_bytes_atomically``.)
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import glob
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cov3d.errors import Cov3dError, one_line

TEMP_SUFFIX = ".tmp"
"""Suffix of a file being written; never read as the file itself."""

TEMP_RANDOM_CHARS = 8
"""Random characters ``tempfile.mkstemp`` puts between prefix and suffix."""
TEMP_RANDOM_ALPHABET = "[a-z0-9_]"
"""The characters ``tempfile`` draws them from, as a glob class."""

DEFAULT_NAME_MAX = 255
"""The longest file name where the file system does not say (most have 255 bytes)."""

FULL_DISK_BYTES = 16 * 2**20
"""Free space under which a failed write is put down to a full disk (the failed write itself
has taken what was left)."""


@functools.cache
def file_mode() -> int:
    """The mode ``open`` gives a new file: 0o666 less the process's umask, read once.

    Temporary files (``mkstemp``) are created 0600, so each is given this mode before it is
    renamed into place. The umask is read from ``/proc/self/status`` where Linux has it, since
    ``os.umask`` can only be read by setting it, which other threads would see for a moment.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def write_failure_reason(error: BaseException, folder: Path) -> str | None:
    """Why a write into ``folder`` failed, in words; ``None`` if ``error`` is not about the disk."""
    if isinstance(error, OSError):
        return one_line(error.strerror or error)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return "No space left on device" if free < FULL_DISK_BYTES else None


def _is_out_of_space(error: BaseException) -> bool:
    return not isinstance(error, OSError) or error.errno in (errno.ENOSPC, errno.EDQUOT)


def temporary_prefix(path: Path) -> str:
    """``.<name>.``, with the name cut short where the temporary name (prefix, mkstemp's
    ``TEMP_RANDOM_CHARS`` random characters, ``TEMP_SUFFIX``) would pass the file system's limit
    on a name: a file whose own name is just within it can still be written."""
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = DEFAULT_NAME_MAX
    room = max(1, name_max - TEMP_RANDOM_CHARS - len(TEMP_SUFFIX) - 2)
    return f".{os.fsencode(path.name)[:room].decode(errors='ignore')}."  # the limit counts bytes


def leftover_temporaries(path: Path) -> list[Path]:
    """The temporary files of ``path`` (``.<name>.<random>.tmp``, see ``replaced_atomically``) beside it:
    what writers of ``path`` killed mid-write left, or what writers still running are writing."""
    path = Path(path)
    pattern = f"{glob.escape(temporary_prefix(path))}{TEMP_RANDOM_ALPHABET * TEMP_RANDOM_CHARS}{TEMP_SUFFIX}"
    return sorted(temp for temp in path.parent.glob(pattern) if temp.is_file())


@contextlib.contextmanager
def replaced_atomically(path: Path, remedy: str) -> Iterator[Path]:
    """A temporary path beside ``path`` (``.<name>.<random>.tmp``, so concurrent writers never
    share one) for the block to write; when the block ends the file is flushed to disk and
    renamed over ``path``, with the mode a new file gets under the user's umask (``file_mode``).

    On any error the temporary file is removed. A full disk becomes a one-line ``Cov3dError``
    naming ``path`` and ending with ``remedy``; another failure of the disk (read-only, no
    permission) one that names ``path`` and says to check its folder.
    """
    path = Path(path)
    try:
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=TEMP_SUFFIX)
    except OSError as error:
        raise Cov3dError(
            f"Cannot write {path}: {one_line(error.strerror or error)}. Check that {path.parent} exists and can be written."
        ) from None
    os.close(descriptor)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, file_mode())
        with temp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except Exception as error:
        reason = write_failure_reason(error, path.parent)
        if reason is None:
            raise
        advice = remedy if _is_out_of_space(error) else f"Check that {path.parent} can be written."
        raise Cov3dError(f"Cannot write {path}: {reason}. {advice}") from None
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str, remedy: str) -> None:
    """``path.write_text(text)``, all or nothing (see ``replaced_atomically``)."""
    with replaced_atomically(path, remedy) as temp:
        temp.write_text(text)


def write_bytes_atomically(path: Path, data: bytes, remedy: str) -> None:
    """``path.write_bytes(data)``, all or nothing (see ``replaced_atomically``)."""
    with replaced_atomically(path, remedy) as temp:
        temp.write_bytes(data)


def write_csv_atomically(path: Path, rows: Iterable[Sequence], remedy: str) -> None:
    """Write ``rows`` (the header first) as a CSV file, all or nothing (see ``replaced_atomically``)."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    write_text_atomically(path, text.getvalue(), remedy)
