"""Shards gathered as packed bytes arrive on the first rank exactly, whatever their dtypes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from itloop.stimulus import sharding

from .multirank import BACKENDS, run_ranks

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gather_worker", HERE / "gather_worker.py")
assert _spec is not None
assert _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(HERE))  # the script imports multirank as a sibling
try:
    _spec.loader.exec_module(worker)
finally:
    sys.path.remove(str(HERE))


def _run(out: Path, backend: str, piece: int, mode: str = "same") -> None:
    argv = [str(HERE / "gather_worker.py"), str(out), str(piece), mode, backend]
    run_ranks(3, backend, argv, out / "logs", timeout_s=240)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("piece", [48, sharding.GATHER_PIECE_BYTES])
def test_three_ranks_rows_arrive_bit_exact_in_rank_order(
    tmp_path: Path, piece: int, backend: str
) -> None:
    _run(tmp_path, backend, piece)
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
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mode", "named"), [("extra", "extra"), ("shape", "'delta_levels'")])
def test_ranks_whose_tensors_differ_beyond_their_rows_are_refused_by_name(
    tmp_path: Path, mode: str, named: str, backend: str
) -> None:
    _run(tmp_path, backend, sharding.GATHER_PIECE_BYTES, mode)
    for rank in range(3):
        assert named in (tmp_path / f"error{rank}.txt").read_text()
    assert not (tmp_path / "gathered.pt").exists()


def test_without_a_group_the_tensors_come_back_as_they_are() -> None:
    tensors = worker.tensors(0)
    got = sharding.gather_rows_to_first(tensors)
    assert got is not None
    assert all(got[k] is v for k, v in tensors.items())
