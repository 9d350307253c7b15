"""A session's attacks are made in durable chunks: ranges of its (image, site) assignments."""

from __future__ import annotations

from typing import Any

from itloop.stimulus.pipeline import day_chunks
from itloop.worker.generation import _chunk_count, _chunk_work


def _plan(sites: int, images_per_site: int) -> dict[str, Any]:
    site_ids = list(range(100, 100 + sites))
    assignments = [
        {"site_id": site_ids[k % sites], "relative_path": f"img{k}.png"}
        for k in range(sites * images_per_site)
    ]
    return {"sites": site_ids, "assignments": assignments}


def test_chunks_are_ranges_of_the_assignments_and_cover_each_once() -> None:
    plan = _plan(sites=16, images_per_site=42)
    plan["chunks"] = day_chunks(len(plan["assignments"]), 12, 512)
    assert _chunk_count(plan) == 2  # 384 pairs (9 batches) and the other 288
    work = [_chunk_work(plan, c) for c in range(_chunk_count(plan))]
    assert [len(w) for w in work] == [384, 288]
    assert [a for w in work for a in w] == plan["assignments"]


def test_a_plan_recorded_before_chunks_were_ranges_is_made_in_chunks_of_8_sites() -> None:
    """A workflow recovered across an upgrade replays its recorded plan: the chunks it has made
    must be the ones it makes on."""
    plan = _plan(sites=20, images_per_site=3)
    assert _chunk_count(plan) == 3
    work = [_chunk_work(plan, c) for c in range(3)]
    assert [{a["site_id"] for a in w} for w in work] == [
        set(range(100, 108)),
        set(range(108, 116)),
        set(range(116, 120)),
    ]
    assert sorted(a["relative_path"] for w in work for a in w) == sorted(
        a["relative_path"] for a in plan["assignments"]
    )
