"""One rank of the sharded pipeline test (gloo or NCCL): attack and store its shard."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from multirank import init_rank
from toys import TinyConvNet

from itloop.stimulus import AttackConfig, AttackEngine, AttackRows, to_levels
from itloop.stimulus.images import write_png_bytes
from itloop.stimulus.pipeline import KeptStimuli, PngWriter, attack_and_store


def job(device: torch.device | str = "cpu") -> tuple[AttackEngine, torch.Tensor, AttackRows]:
    """48 rows in groups of 6 (3 restarts × 2 signs), batches of 5: over 3 ranks the even split
    (16, 32) falls inside groups. The model on ``device``."""
    model = TinyConvNet(n_sites=3, seed=4).to(device)
    clean = to_levels(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(8)))
    rows = AttackRows.grid([0, 1, 2, 1], [0, 1, 2, 2], [0.25, 0.5], restarts=3)
    engine = AttackEngine(model, AttackConfig(steps=3, batch_size=5, autocast_dtype=None))
    return engine, clean, rows


def keep(
    engine: AttackEngine,
    clean: torch.Tensor,
    rows: AttackRows,
    put: Callable[[bytes], str],
    device: torch.device | str = "cpu",
) -> KeptStimuli:
    """The job's pipeline, its PNGs to ``put``; cuDNN deterministic, so that one process and
    the ranks run the same kernels."""
    with (
        PngWriter(put, workers=2) as writer,
        torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True),
    ):
        return attack_and_store(
            engine,
            clean,
            rows,
            generator=torch.Generator().manual_seed(2),
            writer=writer,
            device=device,
        )


def main(out: Path, backend: str) -> None:
    device = init_rank(backend)
    rank = dist.get_rank()
    engine, clean, rows = job(device)
    store = out / "store"
    kept = keep(engine, clean, rows, lambda data: write_png_bytes(data, store)[0], device)
    torch.save({"result": kept.result.tensors(), "sha256": kept.sha256}, out / f"{rank}.pt")
    dist.barrier()  # leave together (see sharded_worker.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
