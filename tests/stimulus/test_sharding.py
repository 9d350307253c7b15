"""Rows sharded over two ranks (gloo processes, or NCCL ranks on GPUs) give exactly the
single-process result."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from itloop.stimulus import AttackEngine, AttackResult
from itloop.stimulus.sharding import shard_bounds

from .multirank import BACKENDS, run_ranks
from .toys import sharding_job

HERE = Path(__file__).resolve().parent


def test_shard_bounds_cover_rows_contiguously() -> None:
    for n in (0, 1, 7, 16):
        for size in (1, 2, 3, 5):
            bounds = [shard_bounds(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0
            assert bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    with pytest.raises(ValueError, match="rank 2"):
        shard_bounds(4, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_reproduce_the_single_process_result(tmp_path: Path, backend: str) -> None:
    argv = [str(HERE / "sharded_worker.py"), str(tmp_path), backend]
    run_ranks(2, backend, argv, tmp_path / "logs", timeout_s=240)
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    model, images, rows, config = sharding_job()
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        single = AttackEngine(model.to(device), config).run(  # type: ignore[arg-type]
            images.to(device),
            rows,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(3),
        )
    gathered = AttackResult(**torch.load(tmp_path / "0.pt"))
    assert len(gathered) == len(single) == 16
    for name in single.__dataclass_fields__:
        assert torch.equal(getattr(gathered, name), getattr(single, name)), name
    shard = AttackResult(**torch.load(tmp_path / "1.pt"))
    assert shard.row_index.tolist() == list(range(8, 16))


def test_shards_with_cuts_end_only_between_groups_and_nearest_the_even_split() -> None:
    # groups of 6 rows: an even split of 18 rows over 2 ranks (9) would cut the second group
    cuts = [6, 12]
    assert [shard_bounds(18, r, 2, cuts) for r in range(2)] == [(0, 6), (6, 18)]
    # over 4 ranks, boundaries 5, 10, 14 (the first 2 ranks take 5 rows) move to 6, 12 and 12
    assert [shard_bounds(18, r, 4, cuts) for r in range(4)] == [(0, 6), (6, 12), (12, 12), (12, 18)]
    for size in (1, 2, 3, 5):
        bounds = [shard_bounds(18, r, size, cuts) for r in range(size)]
        assert bounds[0][0] == 0
        assert bounds[-1][1] == 18
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        assert all(b[0] in (0, 6, 12) for b in bounds if b[0] < b[1])
    with pytest.raises(ValueError, match=r"cuts \[19\]"):
        shard_bounds(18, 0, 2, [6, 19])
