"""Streaming inference input and output: volumes preprocessed by background workers, and a CSV
that is written row by row and can be resumed.

``volume_stream`` yields one ``ScanItem`` per scan, in order, while ``workers`` processes read and
preprocess the next scans (torch ``DataLoader`` with ``forkserver`` workers, each holding at most
``PREFETCH_PER_WORKER`` scans, so memory does not depend on the number of scans). Each scan is
preprocessed once per distinct input size, through that size's ``VolumeCache``.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import Cov3dError
from .preprocess import VolumeCache

SizeKey = tuple[int, int, int, bool]
"""An input size: (depth, height, width, fast_decode)."""
PREFETCH_PER_WORKER = 2
"""Scans each worker prepares ahead of the model."""


@dataclass
class ScanItem:
    """One scan's volumes ``{size: (1, D, H, W) float32}``, or the reason it failed."""

    scan: Path
    volumes: dict[SizeKey, torch.Tensor] | None
    error: str | None = None


class ScanVolumes(Dataset):
    """Scans -> ``ScanItem`` (a failing scan gives its error instead of raising)."""

    def __init__(self, scans: Sequence[Path], caches: dict[SizeKey, VolumeCache]):
        self.scans, self.caches = [Path(scan) for scan in scans], caches

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> ScanItem:
        scan = self.scans[index]
        try:
            return ScanItem(scan, {key: cache.get(scan) for key, cache in self.caches.items()})
        except Cov3dError as error:
            return ScanItem(scan, None, " ".join(str(error).split()))
        except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
            return ScanItem(scan, None, f"Unexpected {type(error).__name__} while reading {scan}: {error}")


def _single(item: ScanItem) -> ScanItem:
    """Collate function of the loader: items pass through unchanged."""
    return item


def _init_worker(_: int) -> None:
    """Workers use one torch thread each; the parallelism is across scans."""
    torch.set_num_threads(1)


def volume_stream(scans: Sequence[Path], caches: dict[SizeKey, VolumeCache], workers: int = 0) -> Iterator[ScanItem]:
    """``ScanItem`` for each scan in order; ``workers`` = 0 reads them in this process."""
    dataset = ScanVolumes(scans, caches)
    if workers == 0 or len(dataset) == 0:
        return iter(dataset[i] for i in range(len(dataset)))
    methods = multiprocessing.get_all_start_methods()
    loader = DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(dataset)), collate_fn=_single,
        worker_init_fn=_init_worker, prefetch_factor=PREFETCH_PER_WORKER,
        multiprocessing_context="forkserver" if "forkserver" in methods else "spawn",
    )
    return iter(loader)


def completed_paths(output: Path, columns: Sequence[str]) -> set[str]:
    """Paths of the scans already in the CSV ``output`` (empty if it does not exist).

    A last line without its newline (a run killed while writing) is cut off the file first.
    Raises ``Cov3dError`` if the file has other columns.
    """
    if not output.is_file() or output.stat().st_size == 0:
        return set()
    data = output.read_bytes()
    if not data.endswith(b"\n"):
        os.truncate(output, data.rfind(b"\n") + 1)
    with output.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is not None and tuple(reader.fieldnames) != tuple(columns):
            raise Cov3dError(
                f"{output} has other columns than this run writes (was --mc-samples different?): "
                "give another --output or run without --resume."
            )
        return {row["path"] for row in reader}


def open_rows(output: Path, columns: Sequence[str], resume: bool) -> tuple[IO[str], csv.DictWriter]:
    """The CSV opened for writing rows: appended to when resuming a file with rows, else new."""
    output.parent.mkdir(parents=True, exist_ok=True)
    append = resume and output.is_file() and output.stat().st_size > 0
    handle = output.open("a" if append else "w", newline="")
    writer = csv.DictWriter(handle, fieldnames=list(columns))
    if not append:
        writer.writeheader()
    return handle, writer


def read_rows(output: Path) -> Iterator[dict[str, str]]:
    """The rows of a predictions CSV, one at a time."""
    with output.open(newline="") as handle:
        yield from csv.DictReader(handle)
