"""RSVP presentation of a verified batch: trials, fixation, re-queueing, frame timing.

``run_session`` owns the session logic shared by every presenter: group the plan into fixation
trials, show each through a ``Presenter``, and re-queue presentations whose trial broke
fixation under the batch's spare event codes (new seqs after the planned ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from itloop.protocol.batches import BatchManifest, PlannedPresentation
from itloop.rig_client.hardware import EventOutput, EyeTracker


@dataclass(frozen=True)
class ScreenGeometry:
    """The monitor as the subject sees it."""

    width_cm: float
    distance_cm: float
    width_px: int
    height_px: int

    def __post_init__(self) -> None:
        for name in ("width_cm", "distance_cm", "width_px", "height_px"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} {getattr(self, name)} must be positive")

    def size_px(self, size_deg: float) -> int:
        """On-screen size of a stimulus of ``size_deg`` centred on the line of sight."""
        size_cm = 2 * self.distance_cm * math.tan(math.radians(size_deg) / 2)
        return max(1, round(size_cm * self.width_px / self.width_cm))

    @property
    def px_per_deg(self) -> float:
        return self.size_px(1.0) / 1.0


def frames_for(duration_ms: float, refresh_hz: float, *, minimum: int = 0) -> int:
    """Whole frames closest to ``duration_ms`` at ``refresh_hz`` (at least ``minimum``)."""
    if refresh_hz <= 0:
        raise ValueError(f"refresh_hz {refresh_hz} must be positive")
    return max(minimum, round(duration_ms * refresh_hz / 1000.0))


@dataclass(frozen=True)
class TrialItem:
    seq: int
    stimulus_id: int
    event_code: int


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one image of a trial. ``onset_s`` is on the presenter's clock."""

    shown: bool
    onset_s: float | None
    frame_drops: int
    fixation_ok: bool


@runtime_checkable
class Presenter(Protocol):
    """Shows one fixation trial: images for ``on_frames``, grey mask for ``off_frames`` each."""

    @property
    def refresh_hz(self) -> float: ...

    def run_trial(
        self, trial_index: int, items: Sequence[TrialItem], *, on_frames: int, off_frames: int
    ) -> list[ItemOutcome]: ...


class PresentationRecord(BaseModel):
    """One presentation as it happened, before counting (the presenter's log)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int
    stimulus_id: int
    event_code: int
    trial_index: int
    shown: bool
    onset_s: float | None
    frame_drops: int
    fixation_ok: bool
    requeued_from: int | None = None


@dataclass
class SessionLog:
    records: list[PresentationRecord]
    refresh_hz: float
    on_frames: int
    off_frames: int
    unrequeued: list[int] = field(default_factory=list)


def trials_of(plan: Sequence[PlannedPresentation]) -> list[tuple[int, list[TrialItem]]]:
    ordered = sorted(plan, key=lambda p: p.seq)
    return [
        (trial, [TrialItem(p.seq, p.stimulus_id, p.event_code) for p in group])
        for trial, group in groupby(ordered, key=lambda p: p.trial_index)
    ]


def run_session(
    manifest: BatchManifest,
    presenter: Presenter,
    *,
    max_requeue_rounds: int = 2,
    on_record: Callable[[PresentationRecord], None] | None = None,
) -> SessionLog:
    """Present the whole plan; presentations of broken trials are re-queued once per round
    while spare event codes last."""
    timing = manifest.timing
    on_frames = frames_for(timing.on_ms, presenter.refresh_hz, minimum=1)
    off_frames = frames_for(timing.off_ms, presenter.refresh_hz)
    records: list[PresentationRecord] = []
    spare = list(manifest.spare_event_codes)
    next_seq = max((p.seq for p in manifest.presentations), default=-1) + 1
    next_trial = max((p.trial_index for p in manifest.presentations), default=-1) + 1
    queue = trials_of(manifest.presentations)
    origin: dict[int, int] = {}
    unrequeued: list[int] = []
    for round_index in range(max_requeue_rounds + 1):
        failed: list[TrialItem] = []
        for trial_index, items in queue:
            outcomes = presenter.run_trial(
                trial_index, items, on_frames=on_frames, off_frames=off_frames
            )
            for item, outcome in zip(items, outcomes, strict=True):
                record = PresentationRecord(
                    seq=item.seq,
                    stimulus_id=item.stimulus_id,
                    event_code=item.event_code,
                    trial_index=trial_index,
                    shown=outcome.shown,
                    onset_s=outcome.onset_s,
                    frame_drops=outcome.frame_drops,
                    fixation_ok=outcome.fixation_ok,
                    requeued_from=origin.get(item.seq),
                )
                records.append(record)
                if on_record:
                    on_record(record)
                if not outcome.fixation_ok:
                    failed.append(item)
        if not failed:
            break
        if round_index == max_requeue_rounds:
            unrequeued.extend(i.seq for i in failed)
            break
        requeued: list[TrialItem] = []
        for item in failed:
            if not spare:
                unrequeued.append(item.seq)
                continue
            new = TrialItem(next_seq, item.stimulus_id, spare.pop(0))
            origin[new.seq] = origin.get(item.seq, item.seq)
            next_seq += 1
            requeued.append(new)
        per_trial = timing.images_per_trial
        queue = []
        for start in range(0, len(requeued), per_trial):
            queue.append((next_trial, requeued[start : start + per_trial]))
            next_trial += 1
    return SessionLog(records, presenter.refresh_hz, on_frames, off_frames, unrequeued)


class HeadlessPresenter:
    """A ``Presenter`` without a screen: a simulated frame clock, same events and fixation
    logic as the PsychoPy one. For CI speed; not a replacement for the real presenter."""

    def __init__(
        self,
        event_output: EventOutput,
        eye_tracker: EyeTracker,
        *,
        refresh_hz: float = 60.0,
        start_s: float = 1.0,
        inter_trial_s: float = 0.5,
        drops: Callable[[int], int] | None = None,
    ) -> None:
        self._refresh_hz = refresh_hz
        self.event_output = event_output
        self.eye_tracker = eye_tracker
        self.now_s = start_s
        self.inter_trial_s = inter_trial_s
        self.drops = drops or (lambda _seq: 0)

    @property
    def refresh_hz(self) -> float:
        return self._refresh_hz

    def run_trial(
        self, trial_index: int, items: Sequence[TrialItem], *, on_frames: int, off_frames: int
    ) -> list[ItemOutcome]:
        frame_s = 1.0 / self._refresh_hz
        self.now_s += self.inter_trial_s
        if not self.eye_tracker.acquire_fixation(trial_index):
            return [ItemOutcome(False, None, 0, False) for _ in items]
        outcomes: list[ItemOutcome] = []
        broken = False
        for position, item in enumerate(items):
            if broken:
                outcomes.append(ItemOutcome(False, None, 0, False))
                continue
            dropped = self.drops(item.seq)
            onset = self.now_s
            self.event_output.send(item.event_code)
            self.now_s += (on_frames + off_frames + dropped) * frame_s
            held = self.eye_tracker.fixation_held(trial_index, position)
            broken = not held
            outcomes.append(ItemOutcome(True, onset, dropped, held))
        return outcomes
