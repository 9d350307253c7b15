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
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from itloop.stimulus.sharding import torchrun_command

__all__ = ["BACKENDS", "NCCL", "NEEDS_CUDA", "init_rank", "run_ranks"]

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


def _rank_env(rank: int, size: int, port: int, shared_gpu: bool) -> dict[str, str]:
    env = {
        **os.environ,
        **_QUIET,
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
    return env


def run_ranks(
    size: int, backend: str, argv: Sequence[str], logs: Path, timeout_s: float = 300
) -> str:
    """Run ``argv`` (a script or ``-m`` module and its arguments, under this Python) as ``size``
    ranks of one world on ``backend``; fail the test, showing the failed rank's output, unless
    every rank exits 0. Returns the ranks' output (stdout and stderr), rank by rank.

    gloo: torchrun on this host. nccl: one process per rank with torchrun's environment, on a GPU
    each, or on GPU 0 as hosts of their own (see the module's docstring).
    """
    logs.mkdir(parents=True, exist_ok=True)
    if backend == "gloo":
        cmd = torchrun_command(size, *argv)
        proc = subprocess.run(
            cmd,
            env={**os.environ, **_QUIET},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr
    shared_gpu = torch.cuda.device_count() < size
    port = _free_port()
    paths = [logs / f"rank{r}.log" for r in range(size)]
    procs = []
    for rank, path in enumerate(paths):
        with path.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    env=_rank_env(rank, size, port, shared_gpu),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [path.read_text() for path in paths]
    for rank, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, f"rank {rank} of {size} exited {p.returncode}:\n{text[-3000:]}"
    return "".join(texts)
