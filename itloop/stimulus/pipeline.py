"""Attack and store in one pipeline: PNGs are encoded on CPU threads while the device works.

A day's attack is device-bound and its PNG writing CPU-bound (a 224×224 stimulus takes ~3 ms to
encode on one core). Run one after the other they add up; here each finished batch's kept stimuli
go to a thread pool (zlib releases the GIL) while the device runs the next batch, so the PNG time
hides behind the attack's. Between batches the device waits for the host, so the host's share of
a finished batch is kept small: rows are grouped as views of the batch, and each kept stimulus's
8-bit image is composed on the thread that encodes it.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from itloop.stimulus.attacks import (
    AttackEngine,
    AttackResult,
    AttackRows,
    group_keys,
    select_largest_change,
)
from itloop.stimulus.images import encode_png
from itloop.stimulus.quantisation import from_levels, perturbed_levels
from itloop.stimulus.sharding import Group, gather_rows_to_first, world

__all__ = [
    "CHUNK_ROWS",
    "KeptStimuli",
    "PngWriter",
    "attack_and_store",
    "day_chunks",
    "png_workers",
]

Put = Callable[[bytes], str]
"""Stores PNG bytes and returns their content address (sha256), e.g. ``ContentStore.put``."""


CHUNK_ROWS = 4096
"""A chunk of a day's attacks (one durable step of the worker) is about this many rows: 8 batches
of 512 on a GPU, whatever the device's batch."""


def day_chunks(
    pairs: int, rows_per_pair: int, batch: int, rows: int = CHUNK_ROWS
) -> list[tuple[int, int]]:
    """A day's (image, site) pairs cut into consecutive ranges [start, end) of about ``rows`` rows,
    every pair giving ``rows_per_pair`` rows (its ε × signs), run in batches of ``batch`` rows.

    Each run pads its last batch to ``batch`` rows, so a chunk is a whole number of batches where
    a whole number of pairs makes one: then only the day's last chunk pads. That is the case when
    the fewest pairs that fill whole batches (lcm(rows_per_pair, batch) / rows_per_pair) are at
    most twice a chunk's; otherwise chunks take the pairs of ``rows`` rows, rounded.
    """
    for name, value, least in (
        ("pairs", pairs, 0),
        ("rows_per_pair", rows_per_pair, 1),
        ("batch", batch, 1),
        ("rows", rows, 1),
    ):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    whole = math.lcm(rows_per_pair, batch) // rows_per_pair  # pairs that fill whole batches
    target = rows / rows_per_pair
    size = whole * max(1, round(target / whole)) if whole <= 2 * target else max(1, round(target))
    return [(start, min(start + size, pairs)) for start in range(0, pairs, size)]


def png_workers() -> int:
    """Threads for PNG writing: every core but one (which drives the device), at least one."""
    return max(1, min(32, (os.cpu_count() or 2) - 1))


class PngWriter:
    """Encodes (3, H, W) uint8 images as PNG and stores them on a thread pool, in order.

    ``submit`` returns at once; ``results`` waits for everything submitted and returns the content
    addresses in submission order. At most ``max_pending`` images wait at a time (submit blocks on
    the oldest beyond that), so a slow disk cannot pile a day's stimuli up in memory. A failed
    write is raised where its result is collected: by ``results``, or by a ``submit`` waiting on
    it.
    """

    def __init__(self, put: Put, *, workers: int | None = None, max_pending: int = 4096) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._put = put
        self._pool = ThreadPoolExecutor(workers or png_workers(), thread_name_prefix="png")
        self._pending: deque[Future[str]] = deque()
        self._done: list[str] = []
        self._max_pending = max_pending

    def _write(self, levels: Tensor | np.ndarray) -> str:
        return self._put(encode_png(levels))

    @property
    def submitted(self) -> int:
        """Images submitted so far."""
        return len(self._done) + len(self._pending)

    def submit_stimuli(
        self, clean_levels: Tensor, image_index: Tensor, delta_levels: Tensor
    ) -> range:
        """Queue perturbed stimuli ``clean_levels[image_index] + delta_levels`` ((M, 3, H, W)
        uint8, (R,) int64, (R, 3, H, W) int16, on the CPU), each composed on the thread that
        encodes it; returns their positions in :meth:`results`."""
        if image_index.shape[0] != delta_levels.shape[0]:
            raise ValueError(
                f"{image_index.shape[0]} image indices for {delta_levels.shape[0]} perturbations"
            )
        return self._enqueue(
            self._write_stimulus,
            ((clean_levels, int(i), delta_levels[r]) for r, i in enumerate(image_index.tolist())),
        )

    def _write_stimulus(self, item: tuple[Tensor, int, Tensor]) -> str:
        clean_levels, i, k = item
        return self._write(perturbed_levels(clean_levels[i].numpy(), k.numpy()))

    def _enqueue(self, write: Callable[[Any], str], items: Iterable[Any]) -> range:
        start = self.submitted
        for item in items:
            self._wait_below(self._max_pending)
            self._pending.append(self._pool.submit(write, item))
        return range(start, self.submitted)

    def _wait_below(self, count: int) -> None:
        while len(self._pending) >= count:
            self._done.append(self._pending.popleft().result())

    def submit(self, levels: Iterable[Tensor]) -> range:
        """Queue images (each (3, H, W) uint8, on the CPU) for writing; returns their positions in
        :meth:`results`."""
        return self._enqueue(self._write, levels)

    def results(self) -> list[str]:
        """Content addresses of every image submitted so far, in order (waits for them)."""
        self._wait_below(1)
        return list(self._done)

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class KeptStimuli:
    """The kept row of each (image, site, ε) and the content address of its PNG, in row order."""

    result: AttackResult
    sha256: list[str]


def _group_starts(rows: AttackRows) -> list[int]:
    """Row positions where a new (image, site, ε) begins: where a shard may begin."""
    keys = torch.stack([rows.image_index.double(), rows.site_index.double(), rows.eps_l2], dim=1)
    return (torch.nonzero((keys[1:] != keys[:-1]).any(dim=1)).flatten() + 1).tolist()


def attack_and_store(
    engine: AttackEngine,
    clean_levels: Tensor,
    rows: AttackRows,
    *,
    generator: torch.Generator,
    writer: PngWriter,
    device: torch.device | str = "cpu",
    group: Group = None,
) -> KeptStimuli:
    """Attack ``rows`` batch by batch, keep the larger predicted change per (image, site, ε), and
    hand each batch's kept stimuli to ``writer`` while the device runs the next batch.

    clean_levels: (M, 3, H, W) uint8 clean images on the CPU. The rows of one (image, site, ε)
    (its signs and restarts) must be consecutive, as :meth:`AttackRows.grid` makes them; a group
    cut by a batch boundary waits for the rest of its rows. Same results as
    ``select_largest_change(engine.run(...))``.

    Under torch.distributed each rank of ``group`` (None: the default group) attacks a contiguous
    shard whose ends fall between groups, and stores its own stimuli with its own ``writer``
    (writers of one content store, so the PNGs land in one place); the group's first rank gets
    every kept row and content address, in row order, and the others their own.
    """
    if clean_levels.dtype != torch.uint8 or clean_levels.ndim != 4:
        raise ValueError(
            f"clean_levels must be (M, C, H, W) uint8, got {tuple(clean_levels.shape)} "
            f"{clean_levels.dtype}"
        )
    images = from_levels(clean_levels).to(device)
    if len(rows) == 0:
        return KeptStimuli(
            result=engine.run(images, rows, generator=generator, group=group), sha256=[]
        )
    rank, size = world(group)
    start = writer.submitted
    kept: list[AttackResult] = []
    carry: AttackResult | None = None

    def keep(closed: AttackResult) -> None:
        chosen = select_largest_change(closed)
        kept.append(chosen)
        writer.submit_stimuli(clean_levels, chosen.image_index, chosen.delta_levels)

    cuts = _group_starts(rows) if size > 1 else None
    # Between batches the device waits for this loop, so it copies no more than the kept rows:
    # closed groups are handled as views of the batch, and only a group cut by the batch boundary
    # is joined with its rest.
    for part in engine.run_batches(images, rows, generator=generator, group=group, cuts=cuts):
        with record_function("itloop.pipeline.keep"):
            keys = group_keys(part)
            begin = 0
            if carry is not None:
                same = np.all(keys == group_keys(carry.rows(0, 1))[0], axis=1)
                begin = len(part) if same.all() else int(np.argmin(same))
                carry = AttackResult.concat([carry, part.rows(0, begin)])
                if begin == len(part):
                    continue
                keep(carry)
                carry = None
            trailing = np.all(keys[begin:] == keys[-1], axis=1)[::-1]
            # the last group may go on in the next batch: hold it back
            n_open = len(trailing) if trailing.all() else int(np.argmin(trailing))
            if begin < len(part) - n_open:
                keep(part.rows(begin, len(part) - n_open))
            carry = part.rows(len(part) - n_open, len(part)) if n_open else None
    if carry is not None:
        keep(carry)
    result = AttackResult.concat(kept) if kept else AttackResult.empty(clean_levels.shape[1:])
    sha256 = writer.results()[start : start + len(result)]
    if size > 1:
        gathered = gather_rows_to_first(result.tensors(), group)
        addresses: list[list[str]] | None = [[] for _ in range(size)] if rank == 0 else None
        dist.gather_object(sha256, addresses, group=group, group_dst=0)
        if gathered is not None and addresses is not None:
            result = AttackResult(**gathered)
            sha256 = [sha for part in addresses for sha in part]
    if len(np.unique(group_keys(result), axis=0)) != len(result):
        raise ValueError(
            "rows of one (image, site, ε) are not consecutive: order them as AttackRows.grid does"
        )
    return KeptStimuli(result=result, sha256=sha256)
