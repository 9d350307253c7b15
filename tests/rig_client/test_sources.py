"""Every ``SpikeSource`` passes one conformance test; the NEV writer round-trips through neo."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from itloop.rig_client.acquisition import FakeSpikeSource, Recording, SpikeSource
from itloop.rig_client.blackrock import BlackrockFileSource
from itloop.rig_client.counting import count_presentations, locate_markers
from itloop.rig_client.errors import AcquisitionError
from itloop.rig_client.nev import NevHeader, NevSegment, write_nev
from itloop.rig_client.replay import Replayer

RATE = 30_000
SPIKES = {1: [10, 400, 3000, 3100, 59_000], 2: [15, 3050], 7: []}
EVENTS = ([100, 2000, 30_000], [11, 12, 65535])


def _fake(_tmp: Path) -> SpikeSource:
    return FakeSpikeSource(RATE, SPIKES, *EVENTS, stop_ticks=60_000)


def _blackrock(tmp: Path) -> SpikeSource:
    path = write_nev(
        tmp / "written.nev",
        NevHeader(channels=sorted(SPIKES)),
        [NevSegment(SPIKES, *EVENTS, stop_ticks=60_000)],
    )
    return BlackrockFileSource(path)


def _replayer(_tmp: Path) -> SpikeSource:
    return Replayer(FakeSpikeSource(RATE, SPIKES, stop_ticks=60_000), *EVENTS, tail_ticks=29_999)


SOURCES: dict[str, Callable[[Path], SpikeSource]] = {
    "fake": _fake,
    "blackrock": _blackrock,
    "replay": _replayer,
}


@pytest.mark.parametrize("make", SOURCES.values(), ids=SOURCES.keys())
def test_spike_source_conformance(make: Callable[[Path], SpikeSource], tmp_path: Path) -> None:
    source = make(tmp_path)
    assert isinstance(source, SpikeSource)
    recording = source.read()
    assert isinstance(recording, Recording)
    recording.validate()
    assert recording.tick_rate_hz == RATE
    assert set(recording.channels) == set(SPIKES)
    segment = recording.segments[0]
    for channel, ticks in SPIKES.items():
        assert segment.spikes[channel].dtype == np.int64
        assert segment.spikes[channel].tolist() == ticks
    assert segment.event_ticks.tolist() == EVENTS[0]
    assert segment.event_words.tolist() == EVENTS[1]
    assert segment.stop_ticks == 60_000
    counted = count_presentations(
        recording,
        locate_markers(recording, [11, 12]),
        window_start_ms=0,
        window_end_ms=100,  # [onset, onset + 3000)
        channels=[1, 2, 7],
    )
    assert [c.counts for c in counted] == [(2, 1, 0), (2, 1, 0)]


def test_nev_round_trip_through_neo_blackrockio(tmp_path: Path) -> None:
    import neo

    rng = np.random.default_rng(3)
    channels = list(range(1, 97))
    seg0 = {
        c: np.sort(rng.choice(90_000, size=int(rng.integers(0, 40)), replace=False))
        for c in channels
    }
    seg1 = {c: np.sort(rng.choice(30_000, size=3, replace=False)) for c in channels[:5]}
    path = write_nev(
        tmp_path / "two.nev",
        NevHeader(channels=channels, comment="round trip"),
        [
            NevSegment(seg0, [50, 9000], [3, 4000], stop_ticks=90_000),
            NevSegment(seg1, [10], [77], stop_ticks=30_000),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # neo warns that no .nsX is there to check pauses
        block = neo.io.BlackrockIO(str(path.with_suffix("")), nsx_to_load=[]).read_block()
    assert len(block.segments) == 2
    for segment, spikes, words in zip(
        block.segments, [seg0, seg1], [["3", "4000"], ["77"]], strict=True
    ):
        trains = {st.annotations["channel_id"]: st for st in segment.spiketrains}
        for channel, ticks in spikes.items():
            if len(ticks) == 0:
                continue
            got = np.round(trains[channel].times.rescale("s").magnitude * RATE).astype(np.int64)
            assert got.tolist() == ticks.tolist()
        (digital,) = [e for e in segment.events if e.name == "digital_input_port"]
        assert digital.labels.tolist() == words
    recording = BlackrockFileSource(path).read()
    assert len(recording.segments) == 2
    assert recording.segments[1].event_ticks.tolist() == [10]
    assert not [n for n in recording.notes if "undocumented" in n]


def test_writer_refuses_ticks_beyond_32_bits(tmp_path: Path) -> None:
    with pytest.raises(AcquisitionError, match="32-bit"):
        write_nev(tmp_path / "x.nev", NevHeader(channels=[1]), [NevSegment({1: [2**32]})])


def test_replayer_loops_a_short_recording(tmp_path: Path) -> None:
    recorded = FakeSpikeSource(RATE, {1: [0, 500]}, stop_ticks=1000)
    replayer = Replayer(recorded, [100, 2500], [5, 6], tail_ticks=1000)
    recording = BlackrockFileSource(replayer.write_nev(tmp_path / "replay.nev")).read()
    assert recording.segments[0].spikes[1].tolist() == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert recording.segments[0].event_words.tolist() == [5, 6]
