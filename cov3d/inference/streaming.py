"""Streaming inference input and output: volumes preprocessed by background workers, and a CSV
that is written row by row and can be resumed.

``volume_stream`` yields one ``StreamedScan`` per scan, in order, while ``workers`` processes read and
preprocess the next scans (torch ``DataLoader`` with ``forkserver`` workers, each holding at most
``PREFETCH_PER_WORKER`` scans, so memory does not depend on the number of scans). Each scan is
preprocessed once per distinct input shape (``cov3d.settings.VolumeShape``), through that shape's ``VolumeCache``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch.utils.data import DataLoader, Dataset

from cov3d.atomic import write_text_atomically
from cov3d.errors import Cov3dError, one_line
from cov3d.outputs import csv_header
from cov3d.preprocessing.preprocess import VolumeCache, scan_sources
from cov3d.preprocessing.workers import init_worker, pool_context
from cov3d.settings import VolumeShape

PREFETCH_PER_WORKER = 2
"""Scans each worker prepares ahead of the model."""
RESUME_REMEDY = "Free some space, then run the same command with --resume to predict the other scans."
"""What to do when the predictions CSV cannot be written."""


@dataclass
class StreamedScan:
    """One scan's stored uint8 levels ``{shape: (1, D, H, W)}`` (a quarter of float32's bytes to
    pass from a worker) and its domain measures (``cov3d.dataset.domain``), or the reason it failed."""

    scan: Path
    volumes: dict[VolumeShape, torch.Tensor] | None
    error: str | None = None
    domain: dict | None = None


class ScanVolumes(Dataset):
    """Scans -> ``StreamedScan`` (a failing scan gives its error instead of raising)."""

    def __init__(self, scans: Sequence[Path], caches: dict[VolumeShape, VolumeCache]):
        self.scans, self.caches = [Path(scan) for scan in scans], caches

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> StreamedScan:
        scan = self.scans[index]
        try:
            sources = scan_sources(scan)  # listed once for all sizes (a DICOM series reads every header)
            volumes, domain = {}, None
            for shape, cache in self.caches.items():
                volumes[shape], domain = cache.levels_and_domain(scan, sources)
            return StreamedScan(scan, volumes, domain=domain)
        except Cov3dError as error:
            return StreamedScan(scan, None, one_line(error))
        except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
            return StreamedScan(scan, None, f"Unexpected {type(error).__name__} while reading {scan}: {one_line(error)}")


def _single(item: StreamedScan) -> StreamedScan:
    """Collate function of the loader: items pass through unchanged."""
    return item


def volume_stream(scans: Sequence[Path], caches: dict[VolumeShape, VolumeCache], workers: int = 0) -> Iterator[StreamedScan]:
    """``StreamedScan`` for each scan in order; ``workers`` = 0 reads them in this process."""
    dataset = ScanVolumes(scans, caches)
    if workers == 0 or len(dataset) == 0:
        return iter(dataset[i] for i in range(len(dataset)))
    loader = DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(dataset)), collate_fn=_single,
        worker_init_fn=init_worker, prefetch_factor=PREFETCH_PER_WORKER, multiprocessing_context=pool_context(),
    )
    return iter(loader)


def completed_paths(output: Path, columns: Sequence[str]) -> set[str]:
    """Paths of the scans already in the CSV ``output`` (empty if it does not exist).

    Raises ``Cov3dError``, before touching the file, unless its first line is exactly the header
    of ``columns`` (a cov3d predictions CSV of this kind). Then a last line without its newline
    (a run killed while writing) is cut off the file.
    """
    if not output.is_file() or output.stat().st_size == 0:
        return set()
    if csv_header(output) != tuple(columns):
        raise Cov3dError(
            f"{output} is not a cov3d predictions CSV or has other columns than this run writes (was --mc-samples different?): "
            "give another --output, or run without --resume."
        )
    data = output.read_bytes()
    if not data.endswith(b"\n"):
        os.truncate(output, data.rfind(b"\n") + 1)
    with output.open(newline="") as handle:
        return {row["path"] for row in csv.DictReader(handle)}


def open_rows(output: Path, columns: Sequence[str], resume: bool) -> tuple[IO[str], csv.DictWriter]:
    """The CSV opened for appending rows: when resuming a file with its header, that file; else a new
    file holding only the header, put in place atomically (``write_text_atomically``), so that a full
    disk or a kill never leaves an empty or headerless CSV that a retry would not recognise."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if not (resume and output.is_file() and output.stat().st_size > 0):
        header = io.StringIO(newline="")
        csv.DictWriter(header, fieldnames=list(columns)).writeheader()
        write_text_atomically(output, header.getvalue(), RESUME_REMEDY)
    handle = output.open("a", newline="")
    return handle, csv.DictWriter(handle, fieldnames=list(columns))


class PredictionRows:
    """The predictions CSV open for rows (``open_rows``), as a context manager; each ``write``
    is flushed at once. A failed write or close (a full disk) raises a one-line ``Cov3dError``
    naming the file and saying to resume."""

    def __init__(self, output: Path, columns: Sequence[str], resume: bool):
        self.output = output
        self.handle, self.writer = open_rows(output, columns, resume)

    def _unwritable(self, error: OSError) -> Cov3dError:
        return Cov3dError(
            f"Cannot write {self.output}: {one_line(error.strerror or error)}. {RESUME_REMEDY}"
        )

    def write(self, rows: Sequence[dict[str, str]]) -> None:
        try:
            self.writer.writerows(rows)
            self.handle.flush()
        except OSError as error:
            raise self._unwritable(error) from None

    def __enter__(self) -> PredictionRows:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is not None:
            with contextlib.suppress(OSError):  # closing flushes again, which fails again on a full disk
                self.handle.close()
            return
        try:
            self.handle.close()
        except OSError as error:
            raise self._unwritable(error) from None


def read_rows(output: Path) -> Iterator[dict[str, str]]:
    """The rows of a predictions CSV, one at a time."""
    with output.open(newline="") as handle:
        yield from csv.DictReader(handle)
