"""``Replayer``: a recorded file's spike trains played against a new session's onsets.

For end-to-end rehearsal with real data: the recorded segments are laid end to end (and looped
when the session is longer), the session's event codes are placed at its onsets, and the result
is a ``Recording`` or, through the NEV writer, a real Blackrock file for ``BlackrockFileSource``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itloop.rig_client.acquisition import Recording, RecordingSegment, SpikeSource, Ticks
from itloop.rig_client.errors import AcquisitionError
from itloop.rig_client.nev import NevHeader, NevSegment, write_nev


@dataclass
class Replayer:
    """A ``SpikeSource`` whose spikes come from ``recorded`` and whose markers are new.

    ``channel_map`` maps each output channel to a recorded channel (identity by default);
    ``tail_ticks`` is how long the recording runs past the last onset.
    """

    recorded: SpikeSource
    onset_ticks: Sequence[int]
    event_codes: Sequence[int]
    channel_map: Mapping[int, int] | None = None
    tail_ticks: int = 30_000
    _cache: Recording | None = field(default=None, init=False, repr=False)

    def read(self) -> Recording:
        if self._cache is None:
            self._cache = self._build()
        return self._cache

    def _build(self) -> Recording:
        source = self.recorded.read()
        onsets = np.asarray(list(self.onset_ticks), dtype=np.int64)
        codes = np.asarray(list(self.event_codes), dtype=np.int64)
        if onsets.shape != codes.shape:
            raise AcquisitionError(f"{codes.size} event codes for {onsets.size} onsets")
        if onsets.size and onsets.min() < 0:
            raise AcquisitionError(f"onset tick {int(onsets.min())} is negative")
        mapping = dict(self.channel_map) if self.channel_map else {c: c for c in source.channels}
        unknown = sorted(set(mapping.values()) - set(source.channels))
        if unknown:
            raise AcquisitionError(
                f"recorded channels {unknown[:10]} are not in {source.source or 'the recording'}"
            )
        stop = int(onsets.max()) + self.tail_ticks + 1 if onsets.size else self.tail_ticks + 1
        lengths = [s.stop_ticks - s.start_ticks for s in source.segments]
        period = sum(lengths)
        if period <= 0:
            raise AcquisitionError(f"{source.source or 'the recording'} has zero duration")
        timeline: dict[int, list[Ticks]] = {c: [] for c in source.channels}
        offset = 0
        for segment, length in zip(source.segments, lengths, strict=True):
            for c in source.channels:
                timeline[c].append(segment.spikes[c] - segment.start_ticks + offset)
            offset += length
        loops = -(-stop // period)
        spikes: dict[int, Ticks] = {}
        for out_channel, rec_channel in mapping.items():
            one = (
                np.concatenate(timeline[rec_channel])
                if timeline[rec_channel]
                else np.zeros(0, np.int64)
            )
            tiled = (one[None, :] + period * np.arange(loops, dtype=np.int64)[:, None]).ravel()
            spikes[int(out_channel)] = tiled[tiled < stop]
        order = np.argsort(onsets, kind="stable")
        segment = RecordingSegment(
            index=0,
            start_ticks=0,
            stop_ticks=stop,
            spikes=spikes,
            event_ticks=onsets[order],
            event_words=codes[order],
        )
        note = f"replay of {source.source or 'a recording'} ({period} ticks, looped {loops} times)"
        return Recording(
            source.tick_rate_hz, tuple(sorted(spikes)), (segment,), source="replay", notes=(note,)
        ).validate()

    def write_nev(self, path: str | os.PathLike[str]) -> Path:
        """The replayed session as a NEV 2.3 file."""
        recording = self.read()
        segment = recording.segments[0]
        return write_nev(
            path,
            NevHeader(
                channels=recording.channels,
                tick_rate_hz=recording.tick_rate_hz,
                comment=recording.notes[0][:255],
            ),
            [
                NevSegment(
                    spikes=segment.spikes,
                    event_ticks=segment.event_ticks,
                    event_words=segment.event_words,
                    stop_ticks=segment.stop_ticks,
                )
            ],
        )
