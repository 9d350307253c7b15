"""Ranks for the multi-process tests: gloo processes on the CPU, or NCCL ranks on GPUs.

With as many GPUs as ranks, each NCCL rank takes its own (``LOCAL_RANK``), as under torchrun. With
fewer, the ranks share GPU 0 as if each were a host of its own: NCCL refuses two ranks of one
communicator on one GPU ("Duplicate GPU detected"), and it tells GPUs apart by the host's identity
and the GPU's bus id, so a rank given a host identity of its own (``NCCL_HOSTID``) is taken for
another host and reached over sockets on the loopback interface. Every multi-rank path of NCCL
(point-to-point sends of device buffers, object collectives, groups of one rank) then runs on a
machine with one GPU. Timings of such ranks say nothing about several GPUs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from itloop.stimulus.sharding import torchrun_command

__all__ = [
    "BACKENDS",
    "NCCL",
    "NEEDS_CUDA",
    "Ranked",
    "init_rank",
    "nccl_environments",
    "run_ranks",
]

NEEDS_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
"""Marks of a test that runs NCCL ranks."""

NCCL = pytest.param("nccl", marks=NEEDS_CUDA)
"""The parameter of a test's NCCL run, skipped without a GPU."""

BACKENDS = ["gloo", NCCL]
"""Parameters of a test that runs on gloo processes and, given a GPU, on NCCL ranks."""

_QUIET = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def init_rank(backend: str) -> torch.device:
    """In a rank: join the default group on ``backend``; the rank's device (its GPU under NCCL)."""
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    if backend != "gloo":
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nccl_environments(size: int) -> list[dict[str, str]]:
    """The variables that make processes ``size`` NCCL ranks of one world, rank by rank: torchrun's
    (rank, world, local rank, rendezvous on 127.0.0.1), and with fewer GPUs than ranks a host
    identity of each rank's own on GPU 0 (see the module's docstring)."""
    shared_gpu = torch.cuda.device_count() < size
    port = _free_port()
    envs = []
    for rank in range(size):
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "LOCAL_RANK": "0" if shared_gpu else str(rank),
            "LOCAL_WORLD_SIZE": "1" if shared_gpu else str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        if shared_gpu:
            env.update(
                NCCL_HOSTID=f"itloop-test-host-{rank}",
                NCCL_SOCKET_IFNAME="lo",
                GLOO_SOCKET_IFNAME="lo",
                NCCL_IB_DISABLE="1",
            )
        envs.append(env)
    return envs


@dataclass(frozen=True)
class Ranked:
    """What a run of ranks left: their output and exit status."""

    output: str
    """Every rank's stdout and stderr (torchrun's, or each rank's in turn)."""
    status: int
    """torchrun's exit status, or the first failed rank's; 0 when every rank exited 0."""
    seconds: float
    """From the start to the last rank's end."""


def run_ranks(
    size: int,
    backend: str,
    argv: Sequence[str],
    logs: Path,
    timeout_s: float = 300,
    *,
    check: bool = True,
) -> Ranked:
    """Run ``argv`` (a script or ``-m`` module and its arguments, under this Python) as ``size``
    ranks of one world on ``backend``. With ``check``, fail the test, showing the output, unless
    every rank exits 0.

    gloo: torchrun on this host. nccl: one process per rank with torchrun's environment, on a GPU
    each, or on GPU 0 as hosts of their own (see the module's docstring); as torchrun does, the
    others are stopped as soon as one rank fails.
    """
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if backend == "gloo":
        proc = subprocess.run(
            torchrun_command(size, *argv),
            env={**os.environ, **_QUIET},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        ranked = Ranked(proc.stdout + proc.stderr, proc.returncode, time.monotonic() - start)
    else:
        ranked = _spawn(size, argv, logs, timeout_s, start)
    assert not check or ranked.status == 0, ranked.output[-3000:]
    return ranked


def _spawn(size: int, argv: Sequence[str], logs: Path, timeout_s: float, start: float) -> Ranked:
    paths = [logs / f"rank{r}.log" for r in range(size)]
    procs = []
    for path, env in zip(paths, nccl_environments(size), strict=True):
        with path.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    env={**os.environ, **_QUIET, **env},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        while True:
            codes = [p.poll() for p in procs]
            status = next((c for c in codes if c not in (None, 0)), 0)
            if status or None not in codes:
                break
            assert time.monotonic() - start < timeout_s, f"ranks still running after {timeout_s} s"
            time.sleep(0.2)
    finally:
        for p in procs:  # the others of a failed rank, as torchrun stops them
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = time.monotonic() - start
    output = "".join(f"--- rank {r}\n{path.read_text()}" for r, path in enumerate(paths))
    return Ranked(output, status, seconds)
