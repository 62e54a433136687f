"""Launch traps refused in one line: a plain srun of several tasks, LOCAL_RANK without its GPU, a node name
that resolves to a loopback address when the processes span nodes (the shared-folder check runs in
tests/training/test_ddp_validation.py with 2 processes, as does the kept-weights check, whose messages are
checked here on made-up reports)."""

from pathlib import Path

import pytest

from cov3d.errors import Cov3dError
from cov3d.training import launch
from cov3d.training.distributed import Distributed
from cov3d.training.launch import check_launch, check_same_files, seen_digest

ONE = Distributed()
TWO_ON_ONE_NODE = Distributed(rank=1, local_rank=1, world_size=2, local_world_size=2)
FOUR_ON_TWO_NODES = Distributed(rank=3, local_rank=1, world_size=4, local_world_size=2)
ROUTABLE = "10.1.2.3"


def refused(dist, device="cpu", env=None, gpus=8, address=ROUTABLE) -> str:
    with pytest.raises(Cov3dError) as raised:
        check_launch(dist, device, env or {}, gpu_count=lambda: gpus, host_address=lambda name: address)
    message = str(raised.value)
    assert "\n" not in message and "docs/gpu.md" in message
    return message


def accepted(dist, device="cpu", env=None, gpus=8, address=ROUTABLE) -> None:
    check_launch(dist, device, env or {}, gpu_count=lambda: gpus, host_address=lambda name: address)


def test_plain_srun_of_several_tasks_is_refused():
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
    assert "4 tasks" in refused(ONE, "cuda", env) and "torchrun" in refused(ONE, "cuda", env)


def test_slurm_without_a_plain_srun_is_accepted():
    accepted(ONE, "cuda", {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"})  # a batch script's own process
    accepted(ONE, "cuda", {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"})  # srun of one task
    accepted(TWO_ON_ONE_NODE, "cuda", {"SLURM_STEP_NUM_TASKS": "2", "WORLD_SIZE": "2"})  # srun of torchrun


def test_local_rank_beyond_the_visible_gpus_is_refused():
    message = refused(TWO_ON_ONE_NODE, "cuda", {"CUDA_VISIBLE_DEVICES": "0"}, gpus=1)
    assert "LOCAL_RANK=1" in message and "1 GPU(s)" in message and "CUDA_VISIBLE_DEVICES=0" in message
    assert "--nproc_per_node=1" in message
    accepted(TWO_ON_ONE_NODE, "cuda", gpus=2)
    accepted(TWO_ON_ONE_NODE, "cpu", gpus=0)  # gloo processes on CPUs need no GPU


@pytest.mark.parametrize("address", ["127.0.1.1", "127.0.0.1"])
def test_a_loopback_node_name_across_nodes_is_refused(address):
    message = refused(FOUR_ON_TWO_NODES, address=address)
    assert address in message and "GLOO_SOCKET_IFNAME" in message and "12 h" in message
    accepted(FOUR_ON_TWO_NODES, env={"GLOO_SOCKET_IFNAME": "eth0"}, address=address)
    accepted(TWO_ON_ONE_NODE, address=address)  # one node: loopback is the right address


def test_an_unresolvable_node_name_across_nodes_is_refused():
    def unresolvable(name):
        raise OSError("Name or service not known")

    with pytest.raises(Cov3dError, match="no address"):
        check_launch(FOUR_ON_TWO_NODES, "cpu", {}, host_address=unresolvable)
    accepted(FOUR_ON_TWO_NODES)


@pytest.mark.parametrize(("rank0", "rank1", "message"), [
    ("aa", "bb", "Rank 1 (on node1) reads other bytes in w than rank 0 wrote: its file system shows it an older or another copy"),
    ("aa", None, "Rank 1 (on node1) does not see w, which rank 0 wrote"),
    (None, "bb", "Rank 1 (on node1) sees w, which rank 0 does not"),
    ("aa", "unreadable: Stale file handle", "Rank 1 (on node1) cannot read w (Stale file handle)"),
    ("unreadable: Permission denied", "aa", "Rank 0 cannot read w (Permission denied)"),
])
def test_a_process_that_sees_other_kept_weights_is_named(monkeypatch, rank0, rank1, message):
    reports = [(0, "node0", [None, rank0]), (1, "node1", [None, rank1])]  # the first file: absent everywhere, as agreed
    monkeypatch.setattr(launch, "gather_objects", lambda dist, value: reports)
    with pytest.raises(Cov3dError) as raised:
        check_same_files(TWO_ON_ONE_NODE, [Path("v"), Path("w")], "resume it.")
    assert str(raised.value) == f"{message}; resume it."
    monkeypatch.setattr(launch, "gather_objects", lambda dist, value: [(0, "node0", [rank0]), (1, "node1", [rank0])])
    check_same_files(TWO_ON_ONE_NODE, [Path("w")], "resume it.")  # the same everywhere


def test_seen_digest_of_a_file_missing_and_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "w"
    assert seen_digest(path) is None
    path.write_bytes(b"abc")
    assert seen_digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # SHA-256 of "abc"

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(launch, "file_digest", refuse)
    assert seen_digest(path) == "unreadable: Permission denied"
