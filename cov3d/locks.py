"""One writer per output: an exclusive OS lock held while a command writes a file or a folder.

Every command that writes a named output (a predictions CSV and its submission folder, a run folder, an
exported model file, a stats or Grad-CAM folder, a figure) holds ``writing(output)`` for as long as it
writes. A second process asking for the same output (however its path is spelled) is refused with a
one-line ``OutputBusy`` naming the output and the process that holds it: at once where the holder writes
for long (``infer``, ``train``), after ``SHORT_WRITE_WAIT_SECONDS`` where writing takes a moment.

The lock is ``fcntl.flock`` on a hidden lock file beside the output (``lock_path``), so it dies with its
holder: a killed writer never leaves a stale lock, only a lock file that the next writer takes over. The
holder writes its PID, host, start time and command into the file for the message. The lock file is
removed when the lock is released; a writer that opened it just before then sees that it no longer
names the path and opens the path again. Locks are per process and re-entrant inside one process (a
command that locks an output may call a function that locks it again). Where the file system has no
locks, the output is written without one.

The preprocessed-volume cache is not locked: each entry is written atomically and ``prune-cache``
removes only what no one can read, so preprocessing, training and pruning may share it at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cov3d.errors import Cov3dError, one_line

NAME_BYTES = 255
"""The longest file name most file systems take (ext4, XFS, APFS, NTFS in UTF-16 units)."""
LOCK_SUFFIX = ".cov3d-lock"
"""Suffix of the lock file ``.<output name>.cov3d-lock`` beside an output."""
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
"""``flock`` errors of file systems that have no locks."""
HOLDER_BYTES = 4096
"""Most bytes of the holder's description read from a lock file."""
SHORT_WRITE_WAIT_SECONDS = 60.0
"""How long a command that only writes for a moment at its end (``stats``, ``explain``, ``export``,
``show``) waits for another writer of its output before it is refused: two ``explain`` runs of
different scans into one folder then both finish."""
RETRY_SECONDS = 0.1
"""Interval between tries for a lock held by another process."""

_held: dict[str, tuple[int, int]] = {}
"""Lock files held by this process: path -> (descriptor, nesting depth)."""


class OutputBusy(Cov3dError):
    """``output`` is being written by another process; ``holder`` describes it (empty if unknown)."""

    def __init__(self, output: Path, holder: str, option: str):
        self.output, self.holder = output, holder
        by = f"another cov3d process ({holder})" if holder else "another cov3d process"
        super().__init__(
            f"{output} is being written by {by}: wait for it to finish, or give another {option}."
        )


def lock_path(output: Path) -> Path:
    """The lock file of ``output``: ``.<name>.cov3d-lock`` in the folder of its resolved path, so every
    spelling of the path (``run1``, ``./run1/``, a link to it) has the same lock. A name too long for
    that (file names hold at most ``NAME_BYTES`` bytes) is replaced by its SHA-256."""
    target = Path(os.path.realpath(output))
    name = f".{target.name}{LOCK_SUFFIX}"
    if len(os.fsencode(name)) > NAME_BYTES:
        name = f".{hashlib.sha256(os.fsencode(target.name)).hexdigest()}{LOCK_SUFFIX}"
    return target.parent / name


def holder_description(text: str) -> str:
    """'PID 123 on host, since 12:00:00 UTC: cov3d infer ...' from a lock file's JSON (empty if unreadable)."""
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder["started"])))
        return one_line(f"PID {int(holder['pid'])} on {holder['host']}, since {since}: {holder['command']}")
    except (ValueError, TypeError, KeyError, OverflowError):
        return ""


def _describe_self(descriptor: int) -> None:
    """Write this process's description into the lock file it holds (best effort: a full disk may refuse)."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    command = ["cov3d", *sys.argv[1:]] if program in ("cov3d", "__main__.py") else sys.argv  # also `python -m cov3d`
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(command)})
    with contextlib.suppress(OSError):
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, text.encode(), 0)


def _open_locked(path: Path, output: Path, option: str, wait: float) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock, tried for up to ``wait`` seconds; ``None``
    where the file system has no locks."""
    give_up = time.monotonic() + wait
    while True:
        try:
            with contextlib.suppress(FileExistsError):  # a file in the way: os.open says so below
                path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise Cov3dError(
                f"Cannot write {output}: {one_line(error.strerror or error)}. Check the path and its permissions."
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_description(os.pread(descriptor, HOLDER_BYTES, 0).decode(errors="replace"))
            os.close(descriptor)
            if time.monotonic() >= give_up:
                raise OutputBusy(output, holder, option) from None
            time.sleep(RETRY_SECONDS)
            continue
        except OSError as error:
            os.close(descriptor)
            if error.errno in NO_LOCKS:
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return descriptor
        os.close(descriptor)  # the holder removed it as we opened it: take the path's new file


@contextlib.contextmanager
def writing(output: Path, option: str = "--output", *, brief: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of ``output`` (a file or a folder, existing or not) while the block
    writes it; ``OutputBusy`` (naming ``option`` as the way out) if another process holds it, at once
    or, for a ``brief`` block (one that writes for a moment), after ``SHORT_WRITE_WAIT_SECONDS``."""
    path = lock_path(output)
    key = str(path)
    if key in _held:
        descriptor, depth = _held[key]
        _held[key] = (descriptor, depth + 1)
    else:
        descriptor = _open_locked(path, Path(output), option, SHORT_WRITE_WAIT_SECONDS if brief else 0.0)
        if descriptor is None:
            yield
            return
        _describe_self(descriptor)
        _held[key] = (descriptor, 1)
    try:
        yield
    finally:
        descriptor, depth = _held[key]
        if depth > 1:
            _held[key] = (descriptor, depth - 1)
        else:
            del _held[key]
            with contextlib.suppress(OSError):
                path.unlink()  # while still locked: a waiting writer then opens the path again
            os.close(descriptor)
