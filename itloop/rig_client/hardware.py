"""The rig's hardware seams: event-code output to the acquisition system and the eye tracker."""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@runtime_checkable
class EventOutput(Protocol):
    """Puts a digital word on the acquisition system's input (called at the onset flip)."""

    def send(self, word: int) -> None: ...


@dataclass
class FakeEventOutput:
    """Records every word with the time it was sent (``clock`` seconds)."""

    clock: Callable[[], float] = time.perf_counter
    sent: list[tuple[int, float]] = field(default_factory=list)

    def send(self, word: int) -> None:
        if not 0 < word <= 0xFFFF:
            raise ValueError(f"event word {word} does not fit 16 bits (1..65535)")
        self.sent.append((int(word), self.clock()))

    @property
    def words(self) -> list[int]:
        return [w for w, _t in self.sent]


@runtime_checkable
class EyeTracker(Protocol):
    """Whether the subject fixates; the presenter asks before each trial and at each image."""

    def acquire_fixation(self, trial_index: int) -> bool: ...

    def fixation_held(self, trial_index: int, position: int) -> bool: ...


@dataclass
class FakeEyeTracker:
    """Fixation always acquired; broken at the ``(trial_index, position)`` pairs in ``breaks``
    (first attempt of a trial only, so a re-queued trial can succeed)."""

    breaks: Container[tuple[int, int]] = frozenset()
    refuse_trials: Container[int] = frozenset()
    asked: list[tuple[int, int]] = field(default_factory=list)

    def acquire_fixation(self, trial_index: int) -> bool:
        return trial_index not in self.refuse_trials

    def fixation_held(self, trial_index: int, position: int) -> bool:
        self.asked.append((trial_index, position))
        return (trial_index, position) not in self.breaks
