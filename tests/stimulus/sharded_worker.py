"""One rank of the sharding test, launched by torchrun: run the job, save what this rank returns."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from toys import sharding_job

from itloop.stimulus import AttackEngine, AttackResult


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model, images, rows, config = sharding_job()
    engine = AttackEngine(model, config)  # type: ignore[arg-type]
    result: AttackResult = engine.run(images, rows, generator=torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    rank = dist.get_rank()
    torch.save({k: getattr(result, k) for k in result.__dataclass_fields__}, out_dir / f"{rank}.pt")
    # both ranks leave together: gloo aborted now and then (SIGABRT, "terminate called without an
    # active exception") in the rank that tore its group down while the other still held it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
