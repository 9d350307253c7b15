"""Rows of one job spread over the processes of a torch.distributed group (``torchrun``)."""

from __future__ import annotations

from typing import TypeVar

import torch.distributed as dist

__all__ = ["gather_to_first", "shard_bounds", "world"]

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n_rows; the first n_rows % world_size get one
    more.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_to_first(local: T) -> list[T] | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere); [local] without a group."""
    rank, size = world()
    if size == 1:
        return [local]
    parts: list[T] | None = [local] * size if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    return parts
