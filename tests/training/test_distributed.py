"""Data-parallel training: a real 2-process torchrun run on CPU (gloo), shards, replica digests, one writer."""

import csv
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastai.data.core import TfmdDL

from cov3d.synthetic.generator import generate_dataset
from cov3d.training.checkpoint import load_resume_state
from cov3d.training.distributed import Distributed, ShardedDL, distributed_from_env, gather_strings, run_on_main

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 2
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def ddp_run(module_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """One epoch on 8 scans (6 train: 3 per process, one batch of 2 each) with 2 gloo processes and W&B offline."""
    root = module_dir
    generate_dataset(root / "data", scans=8, test_scans=0, seed=2, slice_size=32, depth_scale=0.05)
    launcher = root / "launch_cov3d.py"
    launcher.write_text("from cov3d.cli import app\napp()\n")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES), str(launcher),
        "train", "--directory", str(root / "data"), "--output-dir", str(root / "run"), "--cache-dir", str(root / "cache"),
        "--depth", "8", "--width", "32", "--epochs", "1", "--penultimate", "8", "--no-pretrained",
        "--device", "cpu", "--precision", "fp32", "--workers", "1", "--wandb",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", result


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and bytes, computed here from the saved checkpoint (not from a live model)."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_replicas_end_with_identical_weights(ddp_run):
    run, _ = ddp_run
    digests = json.loads((run / "summary.json").read_text())["replica_digests"]
    assert len(digests) == PROCESSES and len(set(digests)) == 1
    assert digests[0] == state_digest(load_resume_state(run)["model"])


def test_replicas_share_the_shuffling_but_not_their_seeds(ddp_run):
    """One shuffled order (sharded), but each process its own dropout masks and reflections; the checkpoint
    keeps every process's random states so that a resumed run continues each of them."""
    run, _ = ddp_run
    summary = json.loads((run / "summary.json").read_text())
    assert len(set(summary["replica_shufflers"])) == 1
    assert len(set(summary["replica_seeds"])) == PROCESSES and summary["replica_seeds"][0] == 0
    replica_rng = load_resume_state(run)["replica_rng"]
    assert len(replica_rng) == PROCESSES and not torch.equal(replica_rng[0]["torch"], replica_rng[1]["torch"])


def test_outputs_are_written_once(ddp_run):
    run, result = ddp_run
    with (run / "metrics.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 1
    assert json.loads((run / "config.json").read_text())["world_size"] == PROCESSES
    assert result.stdout.count("Run written to") == PROCESSES  # each process returns; only rank 0 wrote
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".tmp") == []


def test_wandb_offline_writes_one_run(ddp_run):
    run, _ = ddp_run
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    (log_file,) = offline_runs[0].glob("run-*.wandb")
    config = json.loads((run / "config.json").read_text())
    assert config["wandb_id"] in offline_runs[0].name
    logged = log_file.read_bytes()  # W&B's record log: keys are stored as plain strings
    for key in (b"valid_loss", b"presence_f1", b"best_presence_f1", b"best_severity_f1_epoch", b"learning_rate"):
        assert key in logged


def test_shards_split_one_shuffled_order():
    """Both ranks draw the same permutation from the same seed and take alternate items, padded to equal size."""
    shards = []
    for rank in range(PROCESSES):
        random.seed(0)
        loader = TfmdDL(list(range(7)), bs=2, shuffle=True)
        sharded = loader.new(cls=ShardedDL, rank=rank, world_size=PROCESSES)
        shards.append(list(sharded.get_idxs()))
    assert [len(s) for s in shards] == [4, 4]
    assert set(shards[0]) | set(shards[1]) == set(range(7))
    assert len(set(shards[0]) & set(shards[1])) == 1  # one item repeated to pad 7 to 8
    assert len(sharded) == 2


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    dist = distributed_from_env()
    assert dist == Distributed() and dist.is_main and not dist.enabled
    assert gather_strings(dist, "x") == ["x"]
    assert run_on_main(dist, lambda: 42) == 42


def test_the_log_has_no_progress_bar_frames(ddp_run):
    """Standard output is a pipe here: one line per phase and a row per epoch, no bar frames."""
    _, result = ddp_run
    assert "\r" not in result.stdout and "█" not in result.stdout
    assert result.stdout.count("Epoch 1/1: training done") == 1 and result.stdout.count("Epoch 1/1: validation done") == 1
