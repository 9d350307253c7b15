"""The worker's attack batches: the compiled loop's fixed batch fits the day's chunks of sites."""

from __future__ import annotations

import math
from typing import Any

import torch

from itloop.worker.generation import (
    SITES_PER_CHUNK,
    attack_config,
    chunk_count,
    chunk_sites,
    largest_chunk_rows,
)


def _plan(images_per_site: dict[int, int], eps: list[float]) -> dict[str, Any]:
    sites = sorted(images_per_site)
    assignments = [
        {"site_id": s, "relative_path": f"{s}/{k}.png"}
        for s in sites
        for k in range(images_per_site[s])
    ]
    return {"sites": sites, "assignments": assignments, "eps_l2": eps}


def test_a_lab_day_runs_in_unpadded_batches_of_one_site() -> None:
    """200 sites × 42 images × 6 ε × 2 signs, in chunks of 8 sites: 4,032 rows a chunk, run on
    CUDA as 8 batches of 504 (7 of 512 would leave the 8th padded from 448)."""
    plan = _plan(dict.fromkeys(range(200), 42), [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    rows = largest_chunk_rows(plan)
    assert rows == SITES_PER_CHUNK * 42 * 6 * 2
    config = attack_config(100, torch.device("cuda"), rows)
    assert config.batch_size * math.ceil(rows / config.batch_size) == rows
    assert config.batch_size <= 512
    assert config.compile
    assert config.autocast_dtype == torch.bfloat16
    # on a CPU the loop is not compiled, pads nothing, and keeps its small batch
    assert attack_config(100, torch.device("cpu"), rows).batch_size == 32


def test_the_largest_chunk_sets_the_batch_when_sites_have_unequal_images() -> None:
    """Sites with different image counts: the batch comes from the chunk with the most rows, and
    every site lands in exactly one chunk."""
    counts = {s: (3 if s < 8 else 5) for s in range(11)}
    plan = _plan(counts, [1.0, 2.0])
    assert chunk_count(plan) == 2
    seen = [s for c in range(chunk_count(plan)) for s in chunk_sites(plan, c)]
    assert sorted(seen) == plan["sites"]
    assert largest_chunk_rows(plan) == 8 * 3 * 2 * 2  # 96 rows, against 3 × 5 × 4 = 60
    # one batch either way: the loop keeps its full size, so smaller runs share it
    assert attack_config(100, torch.device("cuda"), 96).batch_size == 512
