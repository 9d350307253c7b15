"""The synthetic monkey's recording: Poisson spikes with a latency profile, written as NEV.

Given the presenter's log (onsets of the shown presentations) and each site's firing rate while
each stimulus drives it, this writes what a Cerebus system would have recorded: threshold
crossings per channel (baseline activity throughout, evoked activity from ``latency_ms`` for
``duration_ms`` after each onset) and the digital word of every onset, in 30 kHz ticks. The
rig client then reads the file through neo like a real recording.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from itloop.rig_client.errors import AcquisitionError
from itloop.rig_client.nev import TICK_RATE_HZ, NevHeader, NevSegment, write_nev
from itloop.rig_client.presentation import PresentationRecord

__all__ = ["SyntheticRecording", "record_session"]

RatesFor = Callable[[int], NDArray[np.float64]]
"""stimulus id -> (N,) evoked firing rate in Hz above baseline, one per channel."""


@dataclass(frozen=True)
class SyntheticRecording:
    path: Path
    n_spikes: int
    n_events: int
    duration_ticks: int


def record_session(
    path: Path,
    records: Sequence[PresentationRecord],
    *,
    channels: Sequence[int],
    baseline_hz: NDArray[np.float64],
    evoked_hz: RatesFor,
    seed: int,
    latency_ms: float = 60.0,
    duration_ms: float = 100.0,
    tail_s: float = 1.0,
    tick_rate_hz: int = TICK_RATE_HZ,
) -> SyntheticRecording:
    """Write the NEV file of one session and return what it holds.

    baseline_hz: (N,) spontaneous rate per channel; evoked rates come from ``evoked_hz``.
    """
    shown = [r for r in records if r.shown and r.onset_s is not None]
    if not shown:
        raise AcquisitionError("no shown presentation to record")
    baseline = np.asarray(baseline_hz, dtype=np.float64)
    if baseline.shape != (len(channels),) or (baseline < 0).any():
        raise AcquisitionError(
            f"baseline_hz must be {len(channels)} non-negative rates, got {baseline.tolist()}"
        )
    rng = np.random.default_rng(seed)
    onsets = np.array([round((r.onset_s or 0.0) * tick_rate_hz) for r in shown], dtype=np.int64)
    codes = np.array([r.event_code for r in shown], dtype=np.int64)
    stop = int(onsets.max() + tail_s * tick_rate_hz)
    latency = round(latency_ms * tick_rate_hz / 1000)
    duration = round(duration_ms * tick_rate_hz / 1000)
    cache: dict[int, NDArray[np.float64]] = {}
    evoked = np.empty((len(shown), len(channels)))
    for i, record in enumerate(shown):
        if record.stimulus_id not in cache:
            rates = np.asarray(evoked_hz(record.stimulus_id), dtype=np.float64)
            bad = not np.all(np.isfinite(rates)) or bool((rates < 0).any())
            if rates.shape != (len(channels),) or bad:
                raise AcquisitionError(
                    f"evoked rates of stimulus {record.stimulus_id} must be {len(channels)} "
                    f"finite non-negative numbers, got {rates.tolist()}"
                )
            cache[record.stimulus_id] = rates
        evoked[i] = cache[record.stimulus_id]
    spikes: dict[int, NDArray[np.int64]] = {}
    total = 0
    for j, channel in enumerate(channels):
        n_base = rng.poisson(baseline[j] * stop / tick_rate_hz)
        base = rng.integers(0, stop, size=n_base)
        counts = rng.poisson(evoked[:, j] * duration / tick_rate_hz)
        starts = np.repeat(onsets + latency, counts)
        driven = starts + rng.integers(0, duration, size=starts.size)
        ticks = np.unique(np.concatenate([base, driven]))
        spikes[int(channel)] = ticks
        total += int(ticks.size)
    order = np.argsort(onsets, kind="stable")
    write_nev(
        path,
        NevHeader(channels=[int(c) for c in channels], tick_rate_hz=tick_rate_hz),
        [
            NevSegment(
                spikes=spikes,
                event_ticks=onsets[order],
                event_words=codes[order],
                stop_ticks=stop,
            )
        ],
    )
    return SyntheticRecording(Path(path), total, len(shown), stop)
