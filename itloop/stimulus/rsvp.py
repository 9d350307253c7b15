"""Planning a session's rapid serial visual presentation (RSVP).

Every stimulus is shown ``repeats`` times in one order shuffled over the whole session; a clean
image and the stimuli derived from it (its "partners") are kept at least ``min_partner_gap``
presentations apart so that image-specific adaptation cannot explain a response change; the
order is cut into fixation trials of ``images_per_trial``; every presentation gets its own event
code, and spare codes are reserved for presentations the rig re-queues after broken fixation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_EVENT_CODE",
    "PlanItem",
    "PlanningError",
    "RsvpPlan",
    "StimulusSlot",
    "gap_in_presentations",
    "plan_rsvp",
    "requeue",
]

MAX_EVENT_CODE = 65535  # a 16-bit digital word; 0 means "no event"


class PlanningError(ValueError):
    """The constraints cannot be met; the message names the one at fault."""


@dataclass(frozen=True)
class StimulusSlot:
    """A stimulus to plan: ``group`` is its clean image; ``is_clean`` marks the clean one."""

    key: str
    group: str
    is_clean: bool


@dataclass(frozen=True)
class PlanItem:
    seq: int
    key: str
    event_code: int
    trial_index: int


@dataclass(frozen=True)
class RsvpPlan:
    items: tuple[PlanItem, ...]
    spare_event_codes: tuple[int, ...]
    min_partner_gap: int

    def positions(self, key: str) -> list[int]:
        return [item.seq for item in self.items if item.key == key]


def gap_in_presentations(min_spacing_s: float, on_ms: float, off_ms: float) -> int:
    """The spacing in seconds as a number of presentation slots (rounded up)."""
    slot_s = (on_ms + off_ms) / 1000.0
    if slot_s <= 0:
        raise PlanningError(f"on_ms + off_ms = {on_ms + off_ms} must be positive")
    return math.ceil(min_spacing_s / slot_s) if min_spacing_s > 0 else 0


def plan_rsvp(
    stimuli: Sequence[StimulusSlot],
    *,
    repeats: int,
    images_per_trial: int,
    min_partner_gap: int = 0,
    seed: int,
    first_event_code: int = 1,
    spare_fraction: float = 0.1,
    attempts: int = 20,
) -> RsvpPlan:
    """A shuffled order meeting every constraint, or PlanningError naming the infeasible one."""
    if repeats < 1:
        raise PlanningError(f"repeats {repeats} must be at least 1")
    if images_per_trial < 1:
        raise PlanningError(f"images_per_trial {images_per_trial} must be at least 1")
    if min_partner_gap < 0:
        raise PlanningError(f"min_partner_gap {min_partner_gap} must not be negative")
    keys = [s.key for s in stimuli]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise PlanningError(f"stimulus key {duplicate!r} appears twice")
    total = len(stimuli) * repeats
    n_spare = max(16, math.ceil(total * spare_fraction))
    last_code = first_event_code + total + n_spare - 1
    if first_event_code < 1 or last_code > MAX_EVENT_CODE:
        raise PlanningError(
            f"{total} presentations and {n_spare} spare codes need event codes "
            f"{first_event_code}..{last_code}, beyond the 16-bit limit {MAX_EVENT_CODE}"
        )
    rng = np.random.default_rng(seed)
    order: list[StimulusSlot] | None = None
    for _ in range(attempts):
        order = _try_order(stimuli, repeats, min_partner_gap, rng)
        if order is not None:
            break
    if order is None:
        raise PlanningError(
            f"no order of {total} presentations keeps clean images and their partners "
            f"{min_partner_gap} presentations apart; lower min_partner_spacing_s or add images"
        )
    items = tuple(
        PlanItem(
            seq=seq,
            key=slot.key,
            event_code=first_event_code + seq,
            trial_index=seq // images_per_trial,
        )
        for seq, slot in enumerate(order)
    )
    spare = tuple(range(first_event_code + total, last_code + 1))
    return RsvpPlan(items=items, spare_event_codes=spare, min_partner_gap=min_partner_gap)


def _try_order(
    stimuli: Sequence[StimulusSlot], repeats: int, gap: int, rng: np.random.Generator
) -> list[StimulusSlot] | None:
    pool = [s for s in stimuli for _ in range(repeats)]
    perm = rng.permutation(len(pool))
    remaining = [pool[i] for i in perm]
    if gap == 0:
        return remaining
    placed: list[StimulusSlot] = []
    last_clean: dict[str, int] = {}
    last_partner: dict[str, int] = {}
    while remaining:
        pos = len(placed)
        fits = (
            i
            for i, candidate in enumerate(remaining)
            if pos - (last_partner if candidate.is_clean else last_clean).get(candidate.group, -gap)
            >= gap
        )
        index = next(fits, None)
        if index is None:
            return None
        slot = remaining.pop(index)
        placed.append(slot)
        (last_clean if slot.is_clean else last_partner)[slot.group] = pos
    return placed


def requeue(
    plan: RsvpPlan,
    lost: Sequence[int],
    *,
    used_spare_codes: Sequence[int] = (),
    images_per_trial: int,
) -> list[PlanItem]:
    """New presentations, appended after the plan, for the seqs lost to broken fixation."""
    by_seq = {item.seq: item for item in plan.items}
    free = [c for c in plan.spare_event_codes if c not in set(used_spare_codes)]
    if len(lost) > len(free):
        raise PlanningError(
            f"{len(lost)} presentations to re-queue but {len(free)} spare codes left"
        )
    next_seq = max(by_seq) + 1 if by_seq else 0
    out: list[PlanItem] = []
    for k, seq in enumerate(lost):
        if seq not in by_seq:
            raise PlanningError(f"seq {seq} is not in the plan")
        s = next_seq + k
        out.append(PlanItem(s, by_seq[seq].key, free[k], s // images_per_trial))
    return out
