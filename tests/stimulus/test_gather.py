"""Shards gathered as packed bytes arrive on the first rank exactly, whatever their dtypes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

from itloop.stimulus import sharding
from itloop.stimulus.sharding import torchrun_command

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gather_worker", HERE / "gather_worker.py")
assert _spec is not None
assert _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _torchrun(out: Path, ranks: int, piece: int, mode: str = "same") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = torchrun_command(ranks, str(HERE / "gather_worker.py"), str(out), str(piece), mode)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("piece", [48, sharding.GATHER_PIECE_BYTES])
def test_three_ranks_rows_arrive_bit_exact_in_rank_order(tmp_path: Path, piece: int) -> None:
    _torchrun(tmp_path, 3, piece)
    gathered = torch.load(tmp_path / "gathered.pt")
    parts = [worker.tensors(rank) for rank in range(3)]
    assert list(gathered) == list(parts[0])
    for name, got in gathered.items():
        want = torch.cat([p[name] for p in parts])  # rank 1 has no rows
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        # bytes, not values: NaN, -0.0 and subnormals must survive too
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    assert (tmp_path / "none1.txt").read_text() == "True"
    assert (tmp_path / "none2.txt").read_text() == "True"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "named"), [("extra", "extra"), ("shape", "'delta_levels'")])
def test_ranks_whose_tensors_differ_beyond_their_rows_are_refused_by_name(
    tmp_path: Path, mode: str, named: str
) -> None:
    _torchrun(tmp_path, 3, sharding.GATHER_PIECE_BYTES, mode)
    for rank in range(3):
        assert named in (tmp_path / f"error{rank}.txt").read_text()
    assert not (tmp_path / "gathered.pt").exists()


def test_without_a_group_the_tensors_come_back_as_they_are() -> None:
    tensors = worker.tensors(0)
    got = sharding.gather_rows_to_first(tensors)
    assert got is not None
    assert all(got[k] is v for k, v in tensors.items())
