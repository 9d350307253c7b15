"""What an acquisition system recorded, in integer ticks, behind the ``SpikeSource`` protocol.

Timestamps stay int64 ticks of the acquisition clock (``tick_rate_hz``, 30 kHz on a Cerebus)
from the file to the counts; seconds appear only at the edges (CSV onsets, printed summaries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from itloop.rig_client.errors import AcquisitionError

Ticks = NDArray[np.int64]


def as_ticks(values: object, *, what: str) -> Ticks:
    """``values`` as a 1-D int64 array; refuses floats that are not whole numbers."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise AcquisitionError(f"{what} must be 1-D ticks, got shape {array.shape}")
    whole = np.isfinite(array) & (array == np.round(array)) if array.size else array
    if array.size and not np.issubdtype(array.dtype, np.integer) and not np.all(whole):
        bad = array[~whole][:3]
        raise AcquisitionError(f"{what} must be integer ticks, got {bad.tolist()}")
    return array.astype(np.int64)


@dataclass(frozen=True)
class RecordingSegment:
    """One uninterrupted stretch of the acquisition clock.

    Ticks restart with each segment on a Cerebus reset, so ticks of two segments are never compared.
    ``stop_ticks`` is exclusive: the recording covers ``[start_ticks, stop_ticks)``.
    """

    index: int
    start_ticks: int
    stop_ticks: int
    spikes: Mapping[int, Ticks]
    event_ticks: Ticks
    event_words: NDArray[np.int64]
    photodiode_ticks: Ticks | None = None

    def validate(self, channels: Sequence[int]) -> None:
        """Raise ``AcquisitionError`` naming the first broken invariant."""
        where = f"segment {self.index}"
        if self.stop_ticks < self.start_ticks:
            raise AcquisitionError(
                f"{where}: stop_ticks {self.stop_ticks} is before start_ticks {self.start_ticks}"
            )
        if set(self.spikes) != set(channels):
            raise AcquisitionError(
                f"{where}: spike channels {sorted(self.spikes)[:10]} differ from the recording's "
                f"{list(channels)[:10]}"
            )
        arrays: list[tuple[str, Ticks]] = [(f"channel {c}", t) for c, t in self.spikes.items()]
        arrays.append(("event ticks", self.event_ticks))
        if self.photodiode_ticks is not None:
            arrays.append(("photodiode ticks", self.photodiode_ticks))
        for name, ticks in arrays:
            if ticks.dtype != np.int64:
                raise AcquisitionError(f"{where}: {name} are {ticks.dtype}, not int64 ticks")
            if ticks.size and np.any(np.diff(ticks) < 0):
                i = int(np.argmax(np.diff(ticks) < 0))
                raise AcquisitionError(
                    f"{where}: {name} not sorted at index {i + 1} ({ticks[i]} then {ticks[i + 1]})"
                )
            if ticks.size and (ticks[0] < self.start_ticks or ticks[-1] >= self.stop_ticks):
                raise AcquisitionError(
                    f"{where}: {name} span [{ticks[0]}, {ticks[-1]}] outside "
                    f"[{self.start_ticks}, {self.stop_ticks})"
                )
        if self.event_words.shape != self.event_ticks.shape:
            raise AcquisitionError(
                f"{where}: {self.event_words.size} event words for {self.event_ticks.size} ticks"
            )


@dataclass(frozen=True)
class Recording:
    """Spike times per channel and digital-input words, per segment, in acquisition ticks."""

    tick_rate_hz: int
    channels: tuple[int, ...]
    segments: tuple[RecordingSegment, ...]
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def validate(self) -> Recording:
        if self.tick_rate_hz <= 0:
            raise AcquisitionError(f"tick_rate_hz {self.tick_rate_hz} must be positive")
        if len(set(self.channels)) != len(self.channels):
            raise AcquisitionError(f"channels {list(self.channels)[:10]} list a channel twice")
        if not self.segments:
            raise AcquisitionError(f"recording {self.source or '?'} has no segments")
        for segment in self.segments:
            segment.validate(self.channels)
        return self

    def spike_counts(self) -> dict[int, int]:
        """Total spikes per channel over all segments."""
        return {c: int(sum(s.spikes[c].size for s in self.segments)) for c in self.channels}

    def event_counts(self) -> dict[int, int]:
        """How often each digital word occurs over all segments."""
        words = np.concatenate([s.event_words for s in self.segments])
        values, counts = np.unique(words, return_counts=True)
        return {int(w): int(n) for w, n in zip(values, counts, strict=True)}

    def duration_ticks(self) -> int:
        return sum(s.stop_ticks - s.start_ticks for s in self.segments)


@runtime_checkable
class SpikeSource(Protocol):
    """Anything that yields a ``Recording``: a file reader, a replayer, a fake."""

    def read(self) -> Recording: ...


@dataclass
class FakeSpikeSource:
    """A ``SpikeSource`` over spike and event ticks given in memory (one segment unless given)."""

    tick_rate_hz: int
    spikes: Mapping[int, Sequence[int]]
    event_ticks: Sequence[int] = ()
    event_words: Sequence[int] = ()
    stop_ticks: int | None = None
    photodiode_ticks: Sequence[int] | None = None

    def read(self) -> Recording:
        spikes = {
            int(c): np.sort(as_ticks(list(t), what=f"channel {c}")) for c, t in self.spikes.items()
        }
        ticks = as_ticks(list(self.event_ticks), what="event ticks")
        order = np.argsort(ticks, kind="stable")
        last = [int(t[-1]) for t in spikes.values() if t.size] + [int(v) for v in ticks[-1:]]
        stop = self.stop_ticks if self.stop_ticks is not None else max(last, default=0) + 1
        pd = None
        if self.photodiode_ticks is not None:
            pd = np.sort(as_ticks(list(self.photodiode_ticks), what="photodiode ticks"))
        segment = RecordingSegment(
            index=0,
            start_ticks=0,
            stop_ticks=stop,
            spikes=spikes,
            event_ticks=ticks[order],
            event_words=as_ticks(list(self.event_words), what="event words")[order],
            photodiode_ticks=pd,
        )
        return Recording(
            self.tick_rate_hz, tuple(sorted(spikes)), (segment,), source="fake"
        ).validate()
