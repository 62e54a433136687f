"""Streaming inference: background workers, rows written as produced, resume without duplicates, flat memory."""

import contextlib
import csv
import ctypes
import gc
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cov3d.dataset.scans import find_scans
from cov3d.errors import Cov3dError
from cov3d.inference.ensemble import Ensemble
from cov3d.inference.infer import infer
from cov3d.inference.streaming import StreamedScan
from cov3d.model.network import build_model
from cov3d.runfiles import WEIGHTS_FILES

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def presence_run(module_dir):
    """An untrained presence-only run (lambda = 0) at 4x16x16: the cheapest model to run many scans through."""
    folder = module_dir
    config = {"depth": 4, "height": 32, "width": 32, "outputs": 1, "penultimate": 8, "dropout": 0.5, "pool": "max",
              "final_bias": False}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    state = build_model(outputs=1, penultimate=8).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / WEIGHTS_FILES["presence"]))
    return folder


def make_scans(root, count, size=12):
    """`count` scan folders of two random size x size JPEG slices each."""
    rng = np.random.default_rng(0)
    for i in range(count):
        scan = root / f"ct_scan_{i}"
        scan.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(scan / f"{k}.jpg")
    return find_scans([root])


def read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run(scans, model, output, **options):
    options.setdefault("workers", 0)
    return infer(scans, model, output, cache_dir=output.parent / "cache", device="cpu", precision="fp32", progress=False, **options)


@pytest.mark.slow
def test_interrupted_run_resumes_without_duplicates(presence_run, tmp_path, monkeypatch):
    scans = make_scans(tmp_path / "data", 9)
    reference = read_csv(run(scans, presence_run, tmp_path / "ref.csv", batch_size=2, workers=1) and tmp_path / "ref.csv")

    calls = []
    original = Ensemble.predict

    def crash_on_third_batch(self, volumes):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, volumes)

    monkeypatch.setattr(Ensemble, "predict", crash_on_third_batch)
    output = tmp_path / "out" / "preds.csv"
    with pytest.raises(KeyboardInterrupt):
        run(scans, presence_run, output, batch_size=2)
    assert read_csv(output) == reference[:4]  # the rows of the first two batches were kept
    with output.open("a") as handle:
        handle.write("ct_scan_4,/half/a/row,0.5")  # a row torn by the interruption
    monkeypatch.setattr(Ensemble, "predict", original)

    summary = run(scans, presence_run, output, batch_size=2, resume=True, submission_dir=tmp_path / "sub")
    assert (summary.resumed, summary.predicted) == (4, 5)
    rows = read_csv(output)
    assert [row["path"] for row in rows] == [str(scan) for scan in scans]  # each once, in order
    assert rows == reference  # worker and in-process results agree, and resumed rows are the same
    names = (tmp_path / "sub" / "covid.csv").read_text().split() + (tmp_path / "sub" / "non-covid.csv").read_text().split()
    assert sorted(names) == sorted(scan.name for scan in scans)
    assert not (tmp_path / "sub" / "mild.csv").exists()  # no severity weights, no task-2 files

    again = run(scans, presence_run, output, resume=True)
    assert (again.resumed, again.predicted) == (9, 0) and read_csv(output) == reference


def test_resume_refuses_other_columns(presence_run, tmp_path):
    scans = make_scans(tmp_path / "data", 1)
    run(scans, presence_run, tmp_path / "p.csv")
    with pytest.raises(Cov3dError, match="other columns"):
        run(scans, presence_run, tmp_path / "p.csv", resume=True, mc_samples=2)


def resident_bytes():
    """Resident memory once the allocator has given back what it holds free (glibc's ``malloc_trim``), so
    that memory freed earlier in this worker (other tests, a large freed list) does not count."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_BYTES


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_scans(presence_run, tmp_path):
    """From scan 50 to scan 200 neither the live tensors, dicts (rows) and scan items (a leak of one
    per scan adds 150) nor the resident memory (a leak of one 4x32x32 float32 volume per scan would
    add 2.3 MiB, if the allocator had no freed memory to reuse) may grow."""
    scans = make_scans(tmp_path / "data", 200)
    rows_seen, objects, resident = [], {}, {}

    def measure(row):
        rows_seen.append(row["name"])
        if len(rows_seen) in (50, 200):
            gc.collect()
            resident[len(rows_seen)] = resident_bytes()  # before gc.get_objects' list of every object
            objects[len(rows_seen)] = Counter(type(o) for o in gc.get_objects() if type(o) in (torch.Tensor, dict, StreamedScan))

    summary = run(scans, presence_run, tmp_path / "p.csv", batch_size=25, on_row=measure)
    assert summary.predicted == 200 and len(read_csv(tmp_path / "p.csv")) == 200
    assert max((objects[200] - objects[50]).values(), default=0) < 50, f"more live objects at scan 200: {objects[200] - objects[50]}"
    growth = resident[200] - resident[50]
    assert growth < 2**20, f"RSS grew by {growth / 2**20:.2f} MiB from scan 50 to 200"
