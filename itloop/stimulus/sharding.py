"""Rows of one job spread over the processes of a torch.distributed group (``torchrun``)."""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "GATHER_PIECE_BYTES",
    "gather_rows_to_first",
    "shard_bounds",
    "torchrun_command",
    "world",
]

Group = dist.ProcessGroup | None
"""A process group; None: the default one (``torchrun``'s world), or no group at all."""

GATHER_PIECE_BYTES = 256 * 2**20
""":func:`gather_rows_to_first` moves at most this many bytes per message, so neither end holds
more than this much of a shard on the device at a time."""

_ALIGN = 16
"""Byte alignment of each tensor in a rank's packed buffer (every dtype can be viewed from it)."""


def world(group: Group = None) -> tuple[int, int]:
    """(rank, size) in ``group`` (None: the default group); (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def torchrun_command(ranks: int, *target: str) -> list[str]:
    """The command that starts ``ranks`` processes of ``target`` (a script and its arguments, or
    ``-m``, a module and its arguments) on this host with torchrun, from this Python."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        *target,
    ]


def shard_bounds(
    n_rows: int, rank: int, world_size: int, cuts: Sequence[int] | None = None
) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n_rows; the first n_rows % world_size get one
    more. With ``cuts`` (row positions where a shard may begin), each boundary moves to the
    nearest of them (the lower on a tie), so no run of rows between two cuts is split; a shard
    may then be empty.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    if cuts is None:
        return start, stop
    outside = [c for c in cuts if not 0 <= c <= n_rows]
    if outside:
        raise ValueError(f"cuts {outside} lie outside the rows [0, {n_rows}]")
    allowed = sorted({0, n_rows, *cuts})
    return _nearest(allowed, start), _nearest(allowed, stop)


def _nearest(allowed: list[int], position: int) -> int:
    i = bisect.bisect_left(allowed, position)
    if i < len(allowed) and allowed[i] == position:
        return position
    below, above = allowed[i - 1], allowed[i]
    return below if position - below <= above - position else above


Meta = list[tuple[str, tuple[int, ...], torch.dtype]]
"""Each tensor's name, shape and dtype, in order."""


def _layout(meta: Meta) -> tuple[list[int], int]:
    """Byte offset of each tensor in a packed buffer, and the buffer's length."""
    offsets, end = [], 0
    for _, shape, dtype in meta:
        offsets.append(end)
        end += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return offsets, end


def _comm_device(group: Group) -> torch.device:
    """Where a collective's tensors must be: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bytes(t: Tensor) -> Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


def _check_same(metas: list[Meta]) -> None:
    """Every rank must hold the same names, dtypes and shapes but the first dimension."""
    first = metas[0]
    for rank, meta in enumerate(metas):
        for k, shape, _ in meta:
            if not shape:
                raise ValueError(f"{k!r} on rank {rank} is a scalar: it has no rows to gather")
    for rank, meta in enumerate(metas[1:], start=1):
        if [k for k, _, _ in meta] != [k for k, _, _ in first]:
            raise ValueError(
                f"ranks hold different tensors: rank 0 {[k for k, _, _ in first]}, "
                f"rank {rank} {[k for k, _, _ in meta]}"
            )
        for (k, shape, dtype), (_, shape0, dtype0) in zip(meta, first, strict=True):
            if dtype != dtype0 or shape[1:] != shape0[1:]:
                raise ValueError(
                    f"{k!r} is {dtype0} {shape0} on rank 0 but {dtype} {shape} on rank {rank}: "
                    "only the rows (first dimension) may differ"
                )


def gather_rows_to_first(
    tensors: Mapping[str, Tensor], group: Group = None
) -> dict[str, Tensor] | None:
    """Every rank's rows of each named tensor, concatenated in rank order (dimension 0), on the
    group's first rank as CPU tensors (None elsewhere); the tensors themselves without a group.

    Ranks hold the same names, dtypes and shapes but the number of rows (a shard each). Each other
    rank sends its tensors as one packed byte buffer, not pickled, in pieces of at most
    :data:`GATHER_PIECE_BYTES` (on the current CUDA device under NCCL, else the CPU); the first
    rank copies its own rows once and never sends them. Bytes arrive unchanged: every dtype,
    float64 and bool included, round-trips exactly.
    """
    rank, size = world(group)
    if size == 1:
        return dict(tensors)
    local = {k: t.detach().contiguous() for k, t in tensors.items()}
    meta: Meta = [(k, tuple(t.shape), t.dtype) for k, t in local.items()]
    metas: list[Meta] = [[] for _ in range(size)]
    dist.all_gather_object(metas, meta, group=group)
    _check_same(metas)
    device = _comm_device(group)
    if rank != 0:
        offsets, length = _layout(meta)
        packed = torch.empty(length, dtype=torch.uint8, device=device)
        for off, t in zip(offsets, local.values(), strict=True):
            packed[off : off + t.numel() * t.element_size()].copy_(_bytes(t))
        for start in range(0, length, GATHER_PIECE_BYTES):
            dist.send(packed[start : start + GATHER_PIECE_BYTES], group=group, group_dst=0)
        return None
    rows = [[shape[0] for _, shape, _ in m] for m in metas]
    out = {
        k: torch.empty((sum(r[i] for r in rows), *shape[1:]), dtype=dtype)
        for i, (k, shape, dtype) in enumerate(meta)
    }
    for k, t in local.items():
        out[k][: t.shape[0]].copy_(t)
    at = [t.shape[0] for t in local.values()]  # next free row of each tensor
    for src in range(1, size):
        offsets, length = _layout(metas[src])
        received = torch.empty(length, dtype=torch.uint8)
        staged = device.type != "cpu"  # NCCL receives on the device, gloo straight into place
        piece = torch.empty(
            min(GATHER_PIECE_BYTES, length) if staged else 0, dtype=torch.uint8, device=device
        )
        for start in range(0, length, GATHER_PIECE_BYTES):
            n = min(GATHER_PIECE_BYTES, length - start)
            into = piece[:n] if staged else received[start : start + n]
            dist.recv(into, group=group, group_src=src)
            if staged:
                received[start : start + n].copy_(into)
        for i, ((k, shape, _), off) in enumerate(zip(metas[src], offsets, strict=True)):
            block = out[k][at[i] : at[i] + shape[0]]
            _bytes(block).copy_(received[off : off + block.numel() * block.element_size()])
            at[i] += shape[0]
    return out
