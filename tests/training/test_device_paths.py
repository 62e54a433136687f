"""The CUDA and DDP paths that CPUs can reach: the chosen GPU becomes the current one, deterministic kernels,
loader workers from a fork server sized per process, DDP timeouts, rank-0-only work and per-process seeds."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as torch_dist

from cov3d.errors import Cov3dError
from cov3d.preprocessing.preprocess import VolumeCache
from cov3d.runtime import CUBLAS_WORKSPACE_CONFIG, kernel_choice, resolve_device
from cov3d.settings import TrainSettings, VolumeShape
from cov3d.training import distributed, loaders
from cov3d.training.data import collect_items
from cov3d.training.distributed import Distributed, distributed_from_env, replica_seed, run_on_main, seed_replica
from cov3d.training.loaders import ForkServerLoader, default_loader_workers, training_loaders
from cov3d.training.train import kept_determinism_flags, seed_everything


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA queries answered as on a machine with two GPUs; returns the devices passed to set_device."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    return chosen


def test_the_chosen_gpu_becomes_the_current_one(two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert two_gpus == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 0)]
    with pytest.raises(Cov3dError, match="only 2 CUDA GPU"):
        resolve_device("cuda:2")
    with pytest.raises(Cov3dError, match="Unknown device"):
        resolve_device("cuda:x")


def test_gpu_runs_use_deterministic_kernels_and_say_so(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with kept_determinism_flags():
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        statement = seed_everything(0, torch.device("cuda", 0))
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
    assert "cuBLAS" in statement and "no deterministic CUDA kernel" in statement
    with kept_determinism_flags():
        assert "threads" in kernel_choice(torch.device("cpu"), True)


def test_without_determinism_cudnn_autotunes_and_any_kernel_may_run():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with kept_determinism_flags():
        torch.use_deterministic_algorithms(True)
        statement = seed_everything(0, torch.device("cuda", 0), deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert "--no-deterministic" in statement and "differ" in statement


def test_the_benchmark_times_the_kernels_training_uses(monkeypatch, tiny_dataset, tmp_path):
    from cov3d.workflows import benchmark

    calls = []
    monkeypatch.setattr(benchmark, "seed_everything", lambda *args: calls.append(args) or "")
    settings = TrainSettings(shape=VolumeShape(8, 32, 32), penultimate=8, seed=5)
    items, cache = collect_items(tiny_dataset), VolumeCache(tmp_path, VolumeShape(8, 32, 32))
    benchmark.training_parts(items, cache, settings, torch.device("cpu"))
    benchmark.training_parts(items, cache, settings, torch.device("cpu"), deterministic=False)
    assert calls == [(5, torch.device("cpu"), True), (5, torch.device("cpu"), False)]


def test_loader_workers_start_from_a_fork_server(tiny_dataset, tmp_path):
    """Forking the training process after CUDA started is unsafe: the workers come from a fork server,
    and still deliver batches (the loader pickles to them), sharded under DDP as well."""
    items = collect_items(tiny_dataset)
    cache = VolumeCache(tmp_path / "cache", VolumeShape(8, 32, 32))
    for dist in (Distributed(), Distributed(rank=1, world_size=2, local_world_size=2)):
        dls = training_loaders(items, cache, batch_size=2, reflect=True, device=torch.device("cpu"), workers=1, dist=dist)
        for loader in dls.loaders:
            assert isinstance(loader.fake_l, ForkServerLoader)
            assert loader.fake_l.multiprocessing_context.get_start_method() == "forkserver"
    volumes, targets = next(iter(dls.train))
    assert volumes.shape == (2, 1, 8, 32, 32) and volumes.dtype == torch.float32 and targets.shape == (2, 2)


def test_loader_workers_are_sized_per_process_on_the_node(monkeypatch):
    monkeypatch.setattr(loaders, "available_cpus", lambda: 16)
    cuda = torch.device("cuda", 0)
    assert [default_loader_workers(cuda, n) for n in (1, 2, 4, 8, 16)] == [4, 4, 3, 1, 0]
    assert default_loader_workers(torch.device("cpu"), 1) == 0
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # two nodes of 8 GPUs: 8 processes share this node's cores
    assert distributed_from_env().local_world_size == 8


def test_ddp_waits_for_rank_0_on_a_host_group_with_a_long_timeout(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(torch_dist, "new_group", lambda **kwargs: calls.setdefault("host", kwargs) and "host-group")
    monkeypatch.setenv("COV3D_DDP_WAIT_MINUTES", "300")
    device, started = distributed.start_distributed(Distributed(rank=1, world_size=2), torch.device("cpu"))
    assert started and device == torch.device("cpu")
    assert calls["init"]["timeout"] == distributed.TRAINING_TIMEOUT >= timedelta(minutes=30)
    assert calls["host"] == {"backend": "gloo", "timeout": timedelta(minutes=300)}
    monkeypatch.delenv("COV3D_DDP_WAIT_MINUTES")
    assert distributed.main_only_timeout() == distributed.MAIN_ONLY_TIMEOUT >= timedelta(hours=2)

    # rank 1 does not repeat rank 0's work (checking every cache entry): it receives rank 0's result
    sent = []

    def broadcast(objects, src, group):
        sent.append((src, group))
        objects[0] = "rank 0's items"

    monkeypatch.setattr(torch_dist, "broadcast_object_list", broadcast)
    work = []
    assert run_on_main(Distributed(rank=1, world_size=2), lambda: work.append(1) or "mine") == "rank 0's items"
    assert work == [] and sent == [(0, "host-group")]
    assert run_on_main(Distributed(), lambda: "alone") == "alone"
    distributed._host_group = None


def test_each_process_draws_its_own_dropout_masks():
    """Rank 0 keeps the run's seed (a single process draws the same); the others get independent seeds."""
    assert replica_seed(7, 0) == 7
    seeds = [replica_seed(7, rank) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds == [replica_seed(7, rank) for rank in range(4)]
    masks = []
    for rank in range(2):
        seed_replica(7, rank)
        masks.append(torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert not torch.equal(masks[0], masks[1])


def test_train_passes_the_choice_of_kernels_on_and_resume_takes_it_again(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from cov3d.cli import app
    from cov3d.training import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: calls.append(kwargs) or train_module.TrainResult(tmp_path))
    monkeypatch.setattr(train_module, "resume_training", lambda run, **kwargs: calls.append(kwargs) or train_module.TrainResult(run))
    runner = CliRunner()
    for flags in ([], ["--no-deterministic"]):
        result = runner.invoke(app, ["train", "--directory", str(tmp_path), "--output-dir", str(tmp_path / "run"), *flags])
        assert result.exit_code == 0, result.output
    assert [call["deterministic"] for call in calls] == [True, False]
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--no-deterministic"])
    assert result.exit_code == 0, result.output
    assert calls[-1] == {"deterministic": False}
