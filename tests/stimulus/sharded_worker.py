"""One rank of the sharding test (gloo or NCCL): run the job, save what this rank returns."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from multirank import init_rank
from toys import sharding_job

from itloop.stimulus import AttackEngine, AttackResult


def main(out_dir: Path, backend: str) -> None:
    device = init_rank(backend)
    model, images, rows, config = sharding_job()
    engine = AttackEngine(model.to(device), config)  # type: ignore[arg-type]
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        result: AttackResult = engine.run(
            images.to(device),
            rows,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(3),
        )
    rank = dist.get_rank()
    torch.save({k: getattr(result, k) for k in result.__dataclass_fields__}, out_dir / f"{rank}.pt")
    # both ranks leave together: gloo aborted now and then (SIGABRT, "terminate called without an
    # active exception") in the rank that tore its group down while the other still held it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
