"""The projected step's Triton kernels on the CPU, through Triton's interpreter (a process of its
own: the interpreter must be chosen before Triton is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from itloop.stimulus import fused_step

HERE = Path(__file__).parent


@pytest.mark.skipif(
    fused_step.triton_error() is not None, reason=f"Triton: {fused_step.triton_error()}"
)
def test_the_tiled_step_is_the_compiled_step_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           str(HERE / "interpreted_step.py")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "9 passed" in proc.stdout, proc.stdout[-2000:]
