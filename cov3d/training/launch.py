"""Checks of how a data-parallel run was launched, each failing in one line before any work is lost.

- Slurm's ``srun`` started several tasks that were not started by torchrun: each would train alone on
  cuda:0 and write into the same run folder. Slurm sets ``SLURM_STEP_NUM_TASKS`` in the tasks of an
  ``srun`` step only (a batch script's own process has ``SLURM_NTASKS`` and ``SLURM_PROCID`` too, and
  runs alone legitimately); torchrun sets ``WORLD_SIZE``.
- ``LOCAL_RANK`` at or above the number of visible GPUs (``--nproc_per_node`` larger than the GPUs, or a
  ``CUDA_VISIBLE_DEVICES`` that hides some).
- Processes on several nodes while this node's name resolves to a loopback address and
  ``GLOO_SOCKET_IFNAME`` is unset: the coordination group (gloo) would advertise an address the other
  nodes cannot reach and wait for them until its timeout.
- A run folder or cache that the other processes cannot read (a node's local disk, /tmp): rank 0
  writes a random token into each folder and every process must read it back.
- After training, files rank 0 wrote that every process reads (the kept weights) whose bytes differ
  on some process: a network file system's cache can show a node an older copy for a while.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cov3d.atomic import write_text_atomically
from cov3d.errors import Cov3dError
from cov3d.outputs import file_digest
from cov3d.training.distributed import Distributed, barrier, gather_objects, main_only_timeout, run_on_main

SHARED_TOKEN_FILE = ".cov3d-shared-check"
"""The token file rank 0 writes into each folder every process must read; removed after the check."""
LAUNCH_HELP = "see 'Launch checks' in docs/gpu.md"


def check_launch(dist: Distributed, device_type: str, env: Mapping[str, str] | None = None,
                 gpu_count: Callable[[], int] | None = None,
                 host_address: Callable[[str], str] = socket.gethostbyname) -> None:
    """Refuse a plain ``srun`` of several tasks, a ``LOCAL_RANK`` without its GPU, and a multi-node run whose
    coordination group could not connect (see the module docstring)."""
    env = os.environ if env is None else env
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if tasks > 1 and "WORLD_SIZE" not in env:
        raise Cov3dError(
            f"Slurm started {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}) without torchrun: each would train alone "
            "on cuda:0 into the same run folder. Start one task per node that runs torchrun "
            f"(srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=GPUS ...); {LAUNCH_HELP}."
        )
    if not dist.enabled:
        return
    if device_type == "cuda":
        import torch

        visible = (gpu_count or torch.cuda.device_count)()
        if dist.local_rank >= visible:
            shown = env.get("CUDA_VISIBLE_DEVICES")
            raise Cov3dError(
                f"LOCAL_RANK={dist.local_rank} but this node shows {visible} GPU(s)"
                f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}: start torchrun with "
                f"--nproc_per_node={visible} or fewer, or make more GPUs visible; {LAUNCH_HELP}."
            )
    if dist.world_size > dist.local_world_size and not env.get("GLOO_SOCKET_IFNAME"):
        hostname = socket.gethostname()
        try:
            address = host_address(hostname)
        except OSError:
            address = "no address"
        if address == "no address" or address.startswith("127."):
            hours = main_only_timeout().total_seconds() / 3600
            raise Cov3dError(
                f"This node's name {hostname} resolves to {address}, which the other nodes cannot reach: the "
                f"coordination group would wait for them for {hours:g} h. Set GLOO_SOCKET_IFNAME to the network "
                f"interface the nodes share (`ip -brief address` lists them), e.g. GLOO_SOCKET_IFNAME=eth0; {LAUNCH_HELP}."
            )


def check_shared_folders(dist: Distributed, folders: Mapping[str, Path]) -> None:
    """Refuse to go on unless every process reads the files rank 0 writes in each of `folders`
    ({what: folder}, e.g. {"run folder": ...}); every process calls this. Nothing is left behind."""
    if not dist.enabled:
        return

    def write_tokens() -> dict[str, str]:
        tokens = {}
        for what, folder in folders.items():
            Path(folder).mkdir(parents=True, exist_ok=True)
            tokens[what] = secrets.token_hex(16)
            write_text_atomically(Path(folder) / SHARED_TOKEN_FILE, tokens[what], f"Make {folder} writable.")
        return tokens

    tokens = run_on_main(dist, write_tokens)
    unread = [what for what, token in tokens.items() if read_token(Path(folders[what])) != token]
    reports = gather_objects(dist, (dist.rank, socket.gethostname(), unread))
    barrier(dist)  # every process has read the tokens
    if dist.is_main:
        for folder in folders.values():
            (Path(folder) / SHARED_TOKEN_FILE).unlink(missing_ok=True)
    barrier(dist)  # the tokens are gone on every process's return
    failed = [(rank, host, unread) for rank, host, unread in reports if unread]
    if failed:
        rank, host, unread = failed[0]
        names = " and ".join(f"the {what} {folders[what]}" for what in unread)
        raise Cov3dError(
            f"Rank {rank} (on {host}) cannot read what rank 0 writes in {names} ({len(failed)} of "
            f"{dist.world_size} processes cannot): put them on a file system that every node shares, not on a "
            f"node's local disk such as /tmp; {LAUNCH_HELP}."
        )


def read_token(folder: Path) -> str | None:
    """The token in `folder`, or None when this process cannot read it."""
    try:
        return (folder / SHARED_TOKEN_FILE).read_text()
    except OSError:
        return None


UNREADABLE = "unreadable: "
"""How ``seen_digest`` starts the reason a file cannot be read."""


def seen_digest(path: Path) -> str | None:
    """What this process sees in ``path``: the SHA-256 of its bytes (``cov3d.outputs.file_digest``); None if
    there is no such file; ``UNREADABLE`` and why if it cannot be read."""
    try:
        return file_digest(path) if path.is_file() else None
    except OSError as error:
        return f"{UNREADABLE}{error.strerror or error}"


def check_same_files(dist: Distributed, paths: Sequence[Path], remedy: str) -> None:
    """Refuse to go on unless every process sees what rank 0 sees in each of ``paths``: the same bytes
    (SHA-256, gathered), or no file; every process calls this and all raise alike. The one-line error
    names the first process and file that differ and ends with ``remedy``."""
    if not dist.enabled:
        return
    reports = gather_objects(dist, (dist.rank, socket.gethostname(), [seen_digest(path) for path in paths]))
    expected = reports[0][2]
    for rank, host, seen in reports[1:]:
        for path, ours, main in zip(paths, seen, expected):
            if ours == main:
                continue
            if main is not None and main.startswith(UNREADABLE):
                what = f"Rank 0 cannot read {path} ({main.removeprefix(UNREADABLE)})"
            elif ours is not None and ours.startswith(UNREADABLE):
                what = f"Rank {rank} (on {host}) cannot read {path} ({ours.removeprefix(UNREADABLE)})"
            elif main is None:
                what = f"Rank {rank} (on {host}) sees {path}, which rank 0 does not"
            elif ours is None:
                what = f"Rank {rank} (on {host}) does not see {path}, which rank 0 wrote"
            else:
                what = (f"Rank {rank} (on {host}) reads other bytes in {path} than rank 0 wrote: its file system shows "
                        "it an older or another copy")
            raise Cov3dError(f"{what}; {remedy}")
