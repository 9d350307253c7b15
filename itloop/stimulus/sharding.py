"""Rows of one job spread over the processes of a torch.distributed group (``torchrun``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GATHER_PIECE_BYTES", "gather_tensors_to_first", "shard_bounds", "world"]

Group = dist.ProcessGroup | None
"""A process group; None: the default one (``torchrun``'s world), or no group at all."""

GATHER_PIECE_BYTES = 256 * 2**20
""":func:`gather_tensors_to_first` moves at most this many bytes a rank per collective, so the
first rank's device holds at most world size × this much of the gathered rows at a time."""

_ALIGN = 16
"""Byte alignment of each tensor in a rank's packed buffer (every dtype can be viewed from it)."""


def world(group: Group = None) -> tuple[int, int]:
    """(rank, size) in ``group`` (None: the default group); (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
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


def _layout(meta: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[list[int], int]:
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


def gather_tensors_to_first(
    tensors: Mapping[str, Tensor], group: Group = None
) -> list[dict[str, Tensor]] | None:
    """Every rank's named tensors, in rank order, on the group's first rank as CPU tensors (None
    elsewhere); [tensors] without a group.

    Each rank may hold any shapes (a shard's rows); names must match across ranks. A rank's
    tensors travel as one packed byte buffer, not pickled, in pieces of at most
    :data:`GATHER_PIECE_BYTES` (on the current CUDA device under NCCL, else the CPU). The bytes
    arrive unchanged: every dtype, float64 and bool included, round-trips exactly.
    """
    rank, size = world(group)
    if size == 1:
        return [dict(tensors)]
    local = {k: t.detach().contiguous() for k, t in tensors.items()}
    meta = [(k, tuple(t.shape), t.dtype) for k, t in local.items()]
    metas: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[] for _ in range(size)]
    dist.all_gather_object(metas, meta, group=group)
    names = [[k for k, _, _ in m] for m in metas]
    if any(n != names[0] for n in names):
        raise ValueError(f"ranks hold different tensors: {names}")
    lengths = [_layout(m)[1] for m in metas]
    longest = max(lengths)
    device = _comm_device(group)
    offsets, _ = _layout(meta)
    packed = torch.zeros(longest, dtype=torch.uint8, device=device)
    for off, t in zip(offsets, local.values(), strict=True):
        flat = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1).byte()
        packed[off : off + flat.numel()].copy_(flat)
    received = [torch.empty(n, dtype=torch.uint8) for n in lengths] if rank == 0 else []
    piece = min(GATHER_PIECE_BYTES, longest) or 1
    for start in range(0, longest, piece):
        stop = min(start + piece, longest)
        part = packed[start:stop]
        into = [torch.empty_like(part) for _ in range(size)] if rank == 0 else None
        dist.gather(part, into, group=group, group_dst=0)
        for r, got in enumerate(into or []):
            n = min(stop, lengths[r]) - start
            if n > 0:
                received[r][start : start + n].copy_(got[:n])
    if rank != 0:
        return None
    out = []
    for m, buf in zip(metas, received, strict=True):
        offs, _ = _layout(m)
        out.append(
            {
                k: _unpack(buf, off, shape, dtype)
                for (k, shape, dtype), off in zip(m, offs, strict=True)
            }
        )
    return out


def _unpack(buf: Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A tensor of its own (not a view of ``buf``, which other dtypes view too) from its bytes."""
    n = math.prod(shape)
    if dtype == torch.bool:
        return buf[offset : offset + n].bool().reshape(shape)
    return buf[offset : offset + n * dtype.itemsize].view(dtype).reshape(shape).clone()
