"""Property tests: every constraint of the RSVP plan holds for any feasible input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itloop.stimulus.rsvp import (
    PlanningError,
    StimulusSlot,
    gap_in_presentations,
    plan_rsvp,
    requeue,
)


def _stimuli(n_images: int, partners: int) -> list[StimulusSlot]:
    out = []
    for i in range(n_images):
        out.append(StimulusSlot(f"c{i}", f"g{i}", True))
        out += [StimulusSlot(f"p{i}.{k}", f"g{i}", False) for k in range(partners)]
    return out


@settings(max_examples=60, deadline=None)
@given(
    n_images=st.integers(1, 25),
    partners=st.integers(0, 4),
    repeats=st.integers(1, 4),
    per_trial=st.integers(1, 10),
    gap=st.integers(0, 6),
    seed=st.integers(0, 2**31),
)
def test_every_constraint_holds(
    n_images: int, partners: int, repeats: int, per_trial: int, gap: int, seed: int
) -> None:
    stimuli = _stimuli(n_images, partners)
    try:
        plan = plan_rsvp(
            stimuli, repeats=repeats, images_per_trial=per_trial, min_partner_gap=gap, seed=seed
        )
    except PlanningError as exc:
        assert "apart" in str(exc)  # noqa: PT017 (only an infeasible spacing may be refused)
        return
    keys = [item.key for item in plan.items]
    # every stimulus exactly `repeats` times, nothing else
    assert sorted(keys) == sorted(s.key for s in stimuli for _ in range(repeats))
    assert [item.seq for item in plan.items] == list(range(len(keys)))
    # unique event codes within 16 bits, spare codes disjoint from them
    codes = [item.event_code for item in plan.items]
    assert len(set(codes)) == len(codes)
    assert set(codes).isdisjoint(plan.spare_event_codes)
    assert all(1 <= c <= 65535 for c in (*codes, *plan.spare_event_codes))
    assert len(plan.spare_event_codes) >= 16
    # fixation trials are consecutive blocks of per_trial presentations
    assert all(item.trial_index == item.seq // per_trial for item in plan.items)
    # clean image and its partners at least `gap` presentations apart
    group = {s.key: s for s in stimuli}
    for a in plan.items:
        for b in plan.items:
            sa, sb = group[a.key], group[b.key]
            if sa.group == sb.group and sa.is_clean != sb.is_clean:
                assert abs(a.seq - b.seq) >= gap, (a, b)


def test_order_is_shuffled_over_the_whole_session_and_reproducible() -> None:
    stimuli = _stimuli(200, 2)
    plan = plan_rsvp(stimuli, repeats=2, images_per_trial=8, min_partner_gap=20, seed=5)
    again = plan_rsvp(stimuli, repeats=2, images_per_trial=8, min_partner_gap=20, seed=5)
    other = plan_rsvp(stimuli, repeats=2, images_per_trial=8, min_partner_gap=20, seed=6)
    assert plan == again
    assert plan != other
    index = {s.key: i for i, s in enumerate(stimuli)}
    first_pos = {}
    for item in plan.items:
        first_pos.setdefault(item.key, item.seq)
    r = np.corrcoef([index[k] for k in first_pos], list(first_pos.values()))[0, 1]
    assert abs(r) < 0.15
    # partners land far apart on average, as in the paper's ~25 min of a 5 h session
    clean = {k: v for k, v in first_pos.items() if k.startswith("c")}
    gaps = [abs(first_pos[f"p{i}.0"] - clean[f"c{i}"]) for i in range(200)]
    assert np.mean(gaps) > len(plan.items) / 5


def test_infeasible_spacing_is_refused_with_a_reason() -> None:
    with pytest.raises(PlanningError, match="10 presentations apart"):
        plan_rsvp(_stimuli(1, 3), repeats=2, images_per_trial=4, min_partner_gap=10, seed=0)
    with pytest.raises(PlanningError, match="16-bit"):
        plan_rsvp(_stimuli(20_000, 2), repeats=1, images_per_trial=4, seed=0)
    with pytest.raises(PlanningError, match="'c0' appears twice"):
        plan_rsvp(_stimuli(1, 0) * 2, repeats=1, images_per_trial=4, seed=0)


def test_requeue_uses_fresh_spare_codes() -> None:
    plan = plan_rsvp(_stimuli(10, 1), repeats=2, images_per_trial=5, seed=1)
    lost = [3, 7]
    again = requeue(plan, lost, images_per_trial=5)
    assert [a.key for a in again] == [plan.items[3].key, plan.items[7].key]
    assert [a.seq for a in again] == [len(plan.items), len(plan.items) + 1]
    assert {a.event_code for a in again} <= set(plan.spare_event_codes)
    more = requeue(plan, [0], used_spare_codes=[a.event_code for a in again], images_per_trial=5)
    assert more[0].event_code not in {a.event_code for a in again}
    with pytest.raises(PlanningError, match="seq 999"):
        requeue(plan, [999], images_per_trial=5)


def test_spacing_in_seconds_becomes_presentation_slots() -> None:
    assert gap_in_presentations(25 * 60, 100, 100) == 7500
    assert gap_in_presentations(0.0, 100, 100) == 0
    assert gap_in_presentations(0.3, 100, 100) == 2
