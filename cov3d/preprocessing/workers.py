"""Preprocessing many scans in worker processes: one progress bar, a summary, shards for job arrays.

A failing scan is recorded with its reason and the others go on (unless ``strict``). Workers are
forked from a ``forkserver`` that imports this module once, use one torch thread each, and exit when
the process that started them dies, however it dies (``die_with_parent``).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cov3d.errors import Cov3dError, one_line
from cov3d.limits import WORKERS
from cov3d.preprocessing.preprocess import VolumeCache

PROCESSED, SKIPPED, FAILED = "processed", "skipped", "failed"
"""Outcomes of one scan in ``preprocess_many``."""

PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal this process gets when its parent (the thread that forked it) ends."""
ORPHAN_EXIT_STATUS = 1
"""Exit status of a worker whose parent died."""


@dataclass
class PreprocessSummary:
    """What ``preprocess_many`` did: scans built, scans already up to date, and failures."""

    processed: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of scans handled."""
        return self.processed + self.skipped + len(self.failed)


def available_cpus() -> int:
    """CPU cores this process may use (respects affinity masks set by cluster schedulers)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def select_shard(scan_dirs: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    """The scans of shard ``(i, n)``: every n-th scan from the i-th, after de-duplicating and
    sorting by absolute path, so that shards never overlap and together hold every scan."""
    unique = {Path(scan).resolve(): Path(scan) for scan in scan_dirs}
    ordered = [unique[key] for key in sorted(unique, key=str)]
    if shard is None:
        return ordered
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise Cov3dError(f"A shard (i, n) needs 0 <= i < n, got ({index}, {count}).")
    return ordered[index::count]


def _update_one(cache: VolumeCache, scan_dir: Path) -> tuple[str, str | None]:
    """Outcome (``PROCESSED``/``SKIPPED``/``FAILED``) and failure reason for one scan."""
    try:
        return (PROCESSED if cache.update(scan_dir) else SKIPPED), None
    except Cov3dError as error:
        return FAILED, one_line(error)
    except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
        return FAILED, f"Unexpected {type(error).__name__} while preprocessing {scan_dir}: {one_line(error)}."


def pool_context(*preload: str) -> multiprocessing.context.BaseContext:
    """``forkserver`` where available: one server process imports this module (and the modules in
    `preload`) once and forks each worker from it (cheap on many-core nodes, and safe: the server
    has no threads and has never touched CUDA); otherwise ``spawn``. Never plain ``fork`` of a
    process whose torch may hold threads or an initialised CUDA context. The server starts with
    the first pool that needs it; later `preload` lists only matter before that."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__, *preload])
        return context
    return multiprocessing.get_context("spawn")


def _exit_when_gone(parent_sentinel: int) -> None:
    """Wait until the parent's end of the pipe closes (it died, by any signal), then end this process."""
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(ORPHAN_EXIT_STATUS)


def _die_with_forkserver() -> None:
    """On Linux, have the kernel SIGKILL this worker when its parent process ends: the fork server,
    whose only thread forks every worker. Skipped for a worker started directly by the process that
    uses it (``spawn``), since that process's pool may live in a thread that ends first."""
    parent = multiprocessing.parent_process()
    server = os.getppid()
    if not sys.platform.startswith("linux") or parent is None or server == parent.pid:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() != server:
        os._exit(ORPHAN_EXIT_STATUS)  # the server ended before the request took effect


def die_with_parent() -> None:
    """Make this worker process end when the process that started it dies, by any signal (SIGKILL,
    out-of-memory): a daemon thread waits on ``multiprocessing``'s parent sentinel, a pipe that the
    parent alone holds open (portable). Without it, a worker whose parent was killed waits forever on
    its task queue, and keeps the fork server alive too (each worker holds the server's liveness
    pipe). Forked from a fork server on Linux, the worker also dies with the server (``PR_SET_PDEATHSIG``)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    _die_with_forkserver()
    threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), name="cov3d-parent-watch", daemon=True).start()


def init_worker(*_: object) -> None:
    """Worker processes use one thread each: the parallelism is across scans (a loader passes
    the worker id, which is not needed); they end when their parent dies (``die_with_parent``)."""
    die_with_parent()
    torch.set_num_threads(1)


def _outcome(future: Future) -> tuple[str, str | None]:
    """A finished worker's outcome; a dead worker process counts as a failure."""
    try:
        return future.result()
    except BrokenProcessPool:
        return FAILED, "A worker process died (killed or out of memory): run again with fewer workers."


@contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar; yields the function that advances it by one scan."""
    if not enabled:
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def preprocess_many(
    scan_dirs: Sequence[Path],
    cache: VolumeCache,
    *,
    workers: int | None = None,
    strict: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> PreprocessSummary:
    """Bring the cache up to date for many scans, in parallel, and summarise.

    ``workers``: processes (default: all available cores; 1 runs in this process). Workers are
    started with ``forkserver`` (``spawn`` where unavailable) and use one torch thread each. A failing scan is recorded and the
    others go on, unless ``strict``, which raises ``Cov3dError`` at the first failure.
    ``shard=(i, n)`` handles only shard i of n (see ``select_shard``).
    """
    scans = select_shard(scan_dirs, shard)
    summary = PreprocessSummary()
    order = {scan: position for position, scan in enumerate(scans)}
    WORKERS.check("workers", workers)
    n_workers = min(workers or available_cpus(), len(scans))

    def record(scan: Path, outcome: tuple[str, str | None]) -> None:
        status, reason = outcome
        if status == FAILED:
            summary.failed.append((scan, reason or "unknown error"))
            if strict:
                raise Cov3dError(reason)
        elif status == PROCESSED:
            summary.processed += 1
        else:
            summary.skipped += 1

    size = "×".join(map(str, cache.shape.dims))
    with _progress_bar(progress and bool(scans), len(scans), f"Preprocessing {size}") as advance:
        if n_workers <= 1:
            for scan in scans:
                record(scan, _update_one(cache, scan))
                advance()
        else:
            executor = ProcessPoolExecutor(n_workers, mp_context=pool_context(), initializer=init_worker)
            try:
                futures = {executor.submit(_update_one, cache, scan): scan for scan in scans}
                for future in as_completed(futures):
                    record(futures[future], _outcome(future))
                    advance()
            finally:
                executor.shutdown(wait=True, cancel_futures=True)
    summary.failed.sort(key=lambda failure: order[failure[0]])
    return summary
