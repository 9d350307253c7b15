"""The worker as a child process: started by ``serve`` on the embedded default and by the demo.

The child watches the parent PID it is given and stops by itself when that process is gone, so a
killed server or demo never leaves a worker behind. Nothing here imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import IO

__all__ = ["PARENT_PID_VARIABLE", "start_worker_process", "stop_worker_process"]

PARENT_PID_VARIABLE = "ITLOOP_WORKER_PARENT_PID"


def start_worker_process(
    env: Mapping[str, str], *, output: IO[bytes] | IO[str] | None = None
) -> subprocess.Popen[bytes]:
    """``itloop worker`` with ``env`` (plus this process's PID to watch); output: its log, or
    None to share this process's stdout and stderr."""
    full = {**env, PARENT_PID_VARIABLE: str(os.getpid())}
    return subprocess.Popen(
        [sys.executable, "-m", "itloop", "worker"],
        env=full,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
    )


def stop_worker_process(proc: subprocess.Popen[bytes], *, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns once the process has exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
