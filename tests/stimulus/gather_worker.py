"""One rank of the gather test (gloo or NCCL): gather its tensors, record what arrived."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from multirank import init_rank

from itloop.stimulus import sharding


def tensors(rank: int) -> dict[str, torch.Tensor]:
    """Different shapes on each rank (rank 1 has no rows), every dtype a result holds."""
    g = torch.Generator().manual_seed(rank)
    rows = 5 if rank == 0 else 0 if rank == 1 else 3
    special = torch.tensor([float("nan"), float("inf"), -0.0, 5e-324, 1.0 / 3], dtype=torch.float64)
    return {
        "row_index": torch.arange(rows, dtype=torch.int64) + 100 * rank,
        "sign": torch.where(torch.rand(rows, generator=g) < 0.5, 1, -1).to(torch.int8),
        "eps_l2": special[:rows],
        "delta_levels": torch.randint(-255, 256, (rows, 3, 7, 5), generator=g).to(torch.int16),
        "f_adv": torch.randn(rows, generator=g),
        "kept": torch.rand(rows, generator=g) < 0.5,
    }


def main(out: Path, piece: int, mode: str, backend: str) -> None:
    device = init_rank(backend)
    rank = dist.get_rank()
    sharding.GATHER_PIECE_BYTES = piece
    mine = {k: t.to(device) for k, t in tensors(rank).items()}  # NCCL ranks send from the GPU
    if mode == "extra" and rank == 1:
        mine["extra"] = torch.zeros(1, device=device)
    if mode == "shape" and rank == 2:
        mine["delta_levels"] = mine["delta_levels"][..., :4]
    try:
        got = sharding.gather_rows_to_first(mine)
    except ValueError as exc:
        (out / f"error{rank}.txt").write_text(str(exc))
    else:
        if rank == 0:
            torch.save(got, out / "gathered.pt")
        else:
            (out / f"none{rank}.txt").write_text(str(got is None))
    # leave together (see sharded_worker.py)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
