"""Counting in half-open windows on integer ticks, against a brute-force count."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itloop.rig_client.acquisition import FakeSpikeSource
from itloop.rig_client.counting import (
    Onset,
    count_presentations,
    locate_markers,
    ms_to_ticks,
    onsets_from_seconds,
)
from itloop.rig_client.errors import AcquisitionError

RATE = 30_000


def brute_force(spikes: list[int], onset: int, start: int, end: int) -> int:
    return sum(1 for t in spikes if onset + start <= t < onset + end)


def test_ms_to_ticks_is_exact_for_the_paper_window() -> None:
    assert ms_to_ticks(70, RATE) == 2100
    assert ms_to_ticks(170, RATE) == 5100
    assert ms_to_ticks(0.1, RATE) == 3
    assert ms_to_ticks(33.33, 1000) == 33


@settings(max_examples=60, deadline=None)
@given(
    spikes=st.dictionaries(
        st.integers(1, 4), st.lists(st.integers(0, 20_000), max_size=60), min_size=1, max_size=4
    ),
    onsets=st.lists(st.integers(0, 20_000), min_size=1, max_size=12, unique=True),
    window=st.tuples(st.integers(0, 3000), st.integers(1, 6000)).filter(lambda w: w[0] < w[1]),
    stop=st.integers(20_001, 26_000),
)
def test_counts_match_brute_force(
    spikes: dict[int, list[int]], onsets: list[int], window: tuple[int, int], stop: int
) -> None:
    start_ms, end_ms = window[0] / 30, window[1] / 30  # whole ticks at 30 kHz
    codes = list(range(1, len(onsets) + 1))
    recording = FakeSpikeSource(RATE, spikes, onsets, codes, stop_ticks=stop).read()
    counted = count_presentations(
        recording,
        locate_markers(recording, codes),
        window_start_ms=start_ms,
        window_end_ms=end_ms,
        channels=sorted(spikes),
    )
    for onset, c in zip(onsets, counted, strict=True):
        assert c.valid
        assert c.onset_ticks == onset
        s, e = ms_to_ticks(start_ms, RATE), ms_to_ticks(end_ms, RATE)
        assert c.counts == tuple(brute_force(spikes[ch], onset, s, e) for ch in sorted(spikes))
        assert c.complete == (onset + e <= stop)


def test_window_is_half_open() -> None:
    recording = FakeSpikeSource(RATE, {1: [1000 + 2100, 1000 + 5100, 1000 + 5099]}, [1000], [7])
    (c,) = count_presentations(
        recording.read(),
        [Onset(0, 1000)],
        window_start_ms=70,
        window_end_ms=170,
        channels=[1],
    )
    assert c.counts == (2,)  # 2100 in, 5099 in, 5100 out


def test_missing_and_doubled_markers_are_invalid_not_shifted() -> None:
    recording = FakeSpikeSource(
        RATE, {1: list(range(0, 90_000, 100))}, [1000, 4000, 7000, 9000], [5, 6, 6, 255]
    ).read()
    onsets = locate_markers(recording, [5, 6, 8])
    assert onsets[0] == Onset(0, 1000)
    assert onsets[1].marker_ticks is None
    assert "marked 2 times" in (onsets[1].reason or "")
    assert onsets[2].marker_ticks is None
    assert "no marker for event code 8" in (onsets[2].reason or "")
    counted = count_presentations(
        recording, onsets, window_start_ms=70, window_end_ms=170, channels=[1]
    )
    assert [c.valid for c in counted] == [True, False, False]
    assert counted[1].counts is None
    assert counted[1].onset_ticks is None


def test_window_past_the_end_is_incomplete_not_zero() -> None:
    recording = FakeSpikeSource(RATE, {1: [100, 2500]}, [0, 1000], [1, 2], stop_ticks=4000).read()
    counted = count_presentations(
        recording,
        locate_markers(recording, [1, 2]),
        window_start_ms=70,
        window_end_ms=170,
        channels=[1],
    )
    assert counted[0].complete is False
    assert counted[0].counts == (1,)
    assert counted[1].complete is False


def test_photodiode_moves_the_onset_and_its_absence_invalidates() -> None:
    recording = FakeSpikeSource(
        RATE,
        {1: [1000 + 300 + 2100, 1000 + 2100 - 1]},
        [1000, 20_000],
        [1, 2],
        stop_ticks=40_000,
        photodiode_ticks=[1300],
    ).read()
    a, b = count_presentations(
        recording,
        locate_markers(recording, [1, 2]),
        window_start_ms=70,
        window_end_ms=170,
        channels=[1],
    )
    assert a.onset_ticks == 1300
    assert a.photodiode_delay_ticks == 300
    assert a.counts == (1,)
    assert not b.valid
    assert "photodiode" in (b.invalid_reason or "")


def test_unknown_channel_is_refused() -> None:
    recording = FakeSpikeSource(RATE, {1: [5]}, [0], [1]).read()
    with pytest.raises(AcquisitionError, match=r"channels \[7\]"):
        count_presentations(
            recording, [Onset(0, 0)], window_start_ms=70, window_end_ms=170, channels=[7]
        )


def test_onsets_in_seconds_outside_the_segment_are_invalid() -> None:
    recording = FakeSpikeSource(RATE, {1: [5]}, [], [], stop_ticks=30_000).read()
    inside, outside = onsets_from_seconds(recording, [0.5, 2.0])
    assert inside == Onset(0, 15_000)
    assert outside.marker_ticks is None
    assert "outside segment 0" in (outside.reason or "")


def test_ticks_stay_integers() -> None:
    recording = FakeSpikeSource(RATE, {1: np.arange(10).tolist()}, [0], [1]).read()
    assert recording.segments[0].spikes[1].dtype == np.int64
    with pytest.raises(AcquisitionError, match="integer ticks"):
        FakeSpikeSource(RATE, {1: [1.5]}).read()  # type: ignore[list-item]
