"""Sharded DDP validation: 2 gloo processes (torchrun) score a validation set of 9 items in batches of 2 as
one process does, with no collective inside a batch; the shared-folder check (tests/training/ddp_worker.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cov3d.training.run_figures import validation_logits

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
PROCESSES = 2
TOLERANCE = 1e-6  # sums of the same per-batch losses in another order
pytestmark = pytest.mark.slow  # two fits in two torchrun processes: about 50 s on 2 busy cores


def load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("ddp-validation")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
               str(WORKER), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(PROCESSES)], out


@pytest.fixture(scope="module")
def reference(ranks):
    """fastai's own validation, in this one process, of rank 0's final weights on the whole set."""
    worker = load_worker()
    model = worker.toy_model()
    model.load_state_dict(torch.load(ranks[1] / "weights.pt"))
    learner = worker.reference_learner(model)
    values = learner.validate()
    names = ["valid_loss", *(metric.name for metric in learner.metrics)]
    return dict(zip(names, map(float, values))), model, worker


def test_sharded_scores_equal_one_process(ranks, reference):
    expected, _, _ = reference
    for result in ranks[0]:
        got = result["sharded"]["values"]
        assert got["valid_loss"] == pytest.approx(expected["valid_loss"], rel=TOLERANCE)
        assert {name: got[name] for name in expected if name != "valid_loss"} == {
            name: value for name, value in expected.items() if name != "valid_loss"}


def test_training_loss_is_fastais_average_over_processes(ranks):
    """fastai gathers every batch's loss; the sharded run averages the smoothed loss once per pass."""
    for result in ranks[0]:
        assert result["sharded"]["values"]["train_loss"] == pytest.approx(result["fastai"]["values"]["train_loss"], rel=TOLERANCE)
        assert result["sharded"]["values"]["valid_loss"] == pytest.approx(result["fastai"]["values"]["valid_loss"], rel=TOLERANCE)


def test_each_item_is_validated_once(ranks):
    first, second = (result["sharded"] for result in ranks[0])
    assert (first["valid_batches"], second["valid_batches"]) == (3, 2)  # batches 0, 2, 4 and 1, 3
    assert first["valid_items"] == [0, 1, 4, 5, 8] and second["valid_items"] == [2, 3, 6, 7]


def test_no_collective_inside_a_batch(ranks):
    for result in ranks[0]:
        assert result["fastai"]["collectives"]["in_batch"] > 0  # fastai's Recorder gathers every batch's loss
        assert result["sharded"]["collectives"]["in_batch"] == 0
        assert result["sharded"]["collectives"]["outside"] > 0


def test_processes_validate_with_rank_0s_buffers(ranks):
    first, second = (result["sharded"]["buffers"] for result in ranks[0])
    assert first == second


def test_evaluation_gathers_predictions_in_the_unsharded_order(ranks, reference):
    _, model, worker = reference
    logits, targets = validation_logits(model, worker.valid_loader(), torch.device("cpu"))
    for result in ranks[0]:
        assert result["gathered_targets"] == targets.tolist()
        assert torch.allclose(torch.tensor(result["gathered_logits"]), logits, atol=1e-6)


def test_shared_folder_check(ranks):
    for result in ranks[0]:
        assert result["shared_token_left"] is False
        error = result["unshared_error"]
        assert error is not None and "Rank 1" in error and "run folder run" in error and "\n" not in error
        other = result["other_bytes_error"]  # only the file each process wrote itself differs
        assert other is not None and other.startswith("Rank 1 (on ") and other.endswith("remedy.") and "\n" not in other
        assert "reads other bytes in best.safetensors than rank 0 wrote" in other and "shared" not in other
        assert result["unseen_error"].startswith("Rank 1 (on ")
        assert result["unseen_error"].endswith("does not see rank0-only.safetensors, which rank 0 wrote; remedy.")


def test_a_nan_validation_loss_in_one_shard_stops_every_process_at_its_batch(ranks):
    """Only rank 1 sees the NaN (global batch 4 of 5); both raise it, so none waits in a collective."""
    for result in ranks[0]:
        assert result["non_finite_validation"] == ["validation loss", 4, 5]
