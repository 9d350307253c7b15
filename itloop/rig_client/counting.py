"""Spike counts in half-open windows ``[onset + start, onset + end)`` on integer ticks.

Onsets come from the recording's own digital words (one unique event code per presentation),
moved to the photodiode transition that follows when the recording has one. A presentation whose
marker is missing or doubled is invalid with a reason; it is never shifted onto a neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from itloop.rig_client.acquisition import Recording, Ticks
from itloop.rig_client.errors import AcquisitionError

DEFAULT_MAX_PHOTODIODE_DELAY_MS = 50.0


def ms_to_ticks(ms: float, tick_rate_hz: int) -> int:
    """``ms`` milliseconds as the nearest whole number of ticks (exact for 70 ms at 30 kHz)."""
    exact = Fraction(str(ms)) * tick_rate_hz / 1000
    return int(exact + Fraction(1, 2)) if exact >= 0 else -int(-exact + Fraction(1, 2))


def seconds_to_ticks(onset_s: float, tick_rate_hz: int) -> int:
    return ms_to_ticks(onset_s * 1000.0, tick_rate_hz)


@dataclass(frozen=True)
class Onset:
    """Where a presentation began on the acquisition clock, or why that is unknown."""

    segment: int | None
    marker_ticks: int | None
    reason: str | None = None


@dataclass(frozen=True)
class CountedPresentation:
    """One presentation's counts, one per requested channel, or why it has none."""

    segment: int | None
    marker_ticks: int | None
    onset_ticks: int | None
    photodiode_delay_ticks: int | None
    valid: bool
    invalid_reason: str | None
    complete: bool
    counts: tuple[int, ...] | None


def locate_markers(recording: Recording, codes: Sequence[int]) -> list[Onset]:
    """The onset of each event code: exactly one occurrence in the whole recording, or a reason.

    Words that are not in ``codes`` (a background word stream, task codes) are ignored.
    """
    occurrences: dict[int, list[tuple[int, int]]] = {int(c): [] for c in codes}
    for segment in recording.segments:
        words = segment.event_words
        hit = np.isin(words, np.asarray(list(occurrences), dtype=np.int64))
        for word, tick in zip(words[hit].tolist(), segment.event_ticks[hit].tolist(), strict=True):
            occurrences[int(word)].append((segment.index, int(tick)))
    result = []
    for code in codes:
        found = occurrences[int(code)]
        if len(found) == 1:
            result.append(Onset(found[0][0], found[0][1]))
        elif not found:
            result.append(Onset(None, None, f"no marker for event code {code} in the recording"))
        else:
            where = ", ".join(f"segment {s} tick {t}" for s, t in found[:4])
            result.append(
                Onset(None, None, f"event code {code} marked {len(found)} times ({where})")
            )
    return result


def onsets_from_seconds(
    recording: Recording, onsets_s: Sequence[float], segments: Sequence[int] | None = None
) -> list[Onset]:
    """Onsets given in seconds of a segment's clock (segment 0 unless given), as ticks."""
    by_index = {s.index: s for s in recording.segments}
    result = []
    for i, onset_s in enumerate(onsets_s):
        seg = int(segments[i]) if segments is not None else recording.segments[0].index
        if seg not in by_index:
            result.append(Onset(None, None, f"segment {seg} is not in the recording"))
            continue
        ticks = seconds_to_ticks(float(onset_s), recording.tick_rate_hz)
        segment = by_index[seg]
        if not segment.start_ticks <= ticks < segment.stop_ticks:
            result.append(
                Onset(
                    None,
                    None,
                    f"onset {onset_s} s (tick {ticks}) is outside segment {seg} "
                    f"[{segment.start_ticks}, {segment.stop_ticks})",
                )
            )
            continue
        result.append(Onset(seg, ticks))
    return result


def count_in_windows(spike_ticks: Ticks, starts: Ticks, stops: Ticks) -> NDArray[np.int64]:
    """Spikes in each half-open window ``[starts[i], stops[i])``; ``spike_ticks`` sorted."""
    lo = np.searchsorted(spike_ticks, starts, side="left")
    hi = np.searchsorted(spike_ticks, stops, side="left")
    return (hi - lo).astype(np.int64)


def count_presentations(
    recording: Recording,
    onsets: Sequence[Onset],
    *,
    window_start_ms: float,
    window_end_ms: float,
    channels: Sequence[int],
    max_photodiode_delay_ms: float = DEFAULT_MAX_PHOTODIODE_DELAY_MS,
) -> list[CountedPresentation]:
    """Counts per presentation × channel; incomplete windows flagged, unknown onsets invalid."""
    if window_end_ms <= window_start_ms:
        raise AcquisitionError(
            f"window end {window_end_ms} ms must be after window start {window_start_ms} ms"
        )
    missing = [c for c in channels if c not in recording.channels]
    if missing:
        raise AcquisitionError(
            f"channels {missing[:10]} are not in recording {recording.source or '?'} "
            f"(it has {len(recording.channels)} channels: {list(recording.channels)[:10]}…)"
        )
    rate = recording.tick_rate_hz
    start_ticks = ms_to_ticks(window_start_ms, rate)
    end_ticks = ms_to_ticks(window_end_ms, rate)
    max_delay = ms_to_ticks(max_photodiode_delay_ms, rate)
    by_index = {s.index: s for s in recording.segments}

    out: list[CountedPresentation | None] = [None] * len(onsets)
    per_segment: dict[int, list[tuple[int, int, int, int | None]]] = {}
    for i, onset in enumerate(onsets):
        if onset.segment is None or onset.marker_ticks is None:
            reason = onset.reason or "no onset"
            out[i] = CountedPresentation(None, None, None, None, False, reason, True, None)
            continue
        segment = by_index[onset.segment]
        corrected, delay = onset.marker_ticks, None
        if segment.photodiode_ticks is not None:
            pd = segment.photodiode_ticks
            j = int(np.searchsorted(pd, onset.marker_ticks, side="left"))
            if j >= pd.size or pd[j] >= onset.marker_ticks + max_delay:
                reason = (
                    f"no photodiode transition within {max_photodiode_delay_ms} ms after the "
                    f"marker at segment {onset.segment} tick {onset.marker_ticks}"
                )
                out[i] = CountedPresentation(
                    onset.segment, onset.marker_ticks, None, None, False, reason, True, None
                )
                continue
            corrected = int(pd[j])
            delay = corrected - onset.marker_ticks
        per_segment.setdefault(onset.segment, []).append((i, onset.marker_ticks, corrected, delay))

    for seg_index, items in per_segment.items():
        segment = by_index[seg_index]
        corrected_ticks = np.asarray([c for _i, _m, c, _d in items], dtype=np.int64)
        starts, stops = corrected_ticks + start_ticks, corrected_ticks + end_ticks
        matrix = (
            np.stack([count_in_windows(segment.spikes[c], starts, stops) for c in channels], axis=1)
            if channels
            else np.zeros((len(items), 0), dtype=np.int64)
        )
        complete = (stops <= segment.stop_ticks) & (starts >= segment.start_ticks)
        for row, (i, marker, onset_ticks, delay) in enumerate(items):
            out[i] = CountedPresentation(
                seg_index,
                marker,
                onset_ticks,
                delay,
                True,
                None,
                bool(complete[row]),
                tuple(int(v) for v in matrix[row]),
            )
    return [c for c in out if c is not None]
