"""``BlackrockFileSource``: a Cerebus recording (.nev, with .nsX where usable) through neo."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from neo.core.baseneo import NeoReadWriteError
from neo.rawio import BlackrockRawIO

from itloop.rig_client.acquisition import Recording, RecordingSegment, Ticks
from itloop.rig_client.errors import AcquisitionError

DIGITAL_CHANNEL = "digital_input_port"


@dataclass
class BlackrockFileSource:
    """Spikes (all units of an electrode pooled: multi-unit) and digital-input words of a file.

    ``path`` names the .nev (or its base name). Continuous .nsX files beside it are loaded when
    neo accepts them; a header-only .nsX (it makes neo refuse the pair) is dropped and the .nev
    is read alone, with a note saying so. Ticks are the file's own integer timestamps.
    """

    path: Path
    load_nsx: bool = True

    def read(self) -> Recording:
        nev = _nev_path(self.path)
        notes: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recording = self._read(nev, notes)
        notes.extend(_warning_notes(caught))
        return Recording(
            recording.tick_rate_hz,
            recording.channels,
            recording.segments,
            source=recording.source,
            notes=tuple(dict.fromkeys(notes)),
        ).validate()

    def _read(self, nev: Path, notes: list[str]) -> Recording:
        reader = self._open(nev, notes)
        rate = round(float(reader._nev_basic_header["timestamp_resolution"]))
        if reader.block_count() != 1:
            raise AcquisitionError(f"{nev}: {reader.block_count()} blocks, expected 1")
        declared = [int(e) for e in reader._nev_ext_header[b"NEUEVWAV"]["electrode_id"]]
        units: dict[int, list[int]] = {}
        for index, unit_id in enumerate(reader.header["spike_channels"]["id"]):
            code = int(str(unit_id).split()[-1])
            units.setdefault(code // 1000, []).append(index)
        channels = tuple(sorted(set(declared) | set(units)))
        event_names = list(reader.header["event_channels"]["name"])
        digital = event_names.index(DIGITAL_CHANNEL) if DIGITAL_CHANNEL in event_names else None
        segments = []
        for seg in range(reader.segment_count(0)):
            spikes: dict[int, Ticks] = {}
            for channel in channels:
                parts = [
                    np.asarray(reader.get_spike_timestamps(0, seg, u, None, None), dtype=np.int64)
                    for u in units.get(channel, [])
                ]
                spikes[channel] = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            ticks = np.zeros(0, dtype=np.int64)
            words = np.zeros(0, dtype=np.int64)
            if digital is not None:
                raw_ticks, _dur, labels = reader.get_event_timestamps(0, seg, digital, None, None)
                ticks = np.asarray(raw_ticks, dtype=np.int64)
                words = np.asarray([int(w) for w in labels], dtype=np.int64)
                order = np.argsort(ticks, kind="stable")
                ticks, words = ticks[order], words[order]
            start = round(reader.segment_t_start(0, seg) * rate)
            stop = round(reader.segment_t_stop(0, seg) * rate) + 1  # t_stop is the last tick
            last = [int(t[-1]) for t in spikes.values() if t.size] + [int(t) for t in ticks[-1:]]
            first = [int(t[0]) for t in spikes.values() if t.size] + [int(t) for t in ticks[:1]]
            start = min([start, *first])
            stop = max([stop, *(t + 1 for t in last)])
            segments.append(
                RecordingSegment(
                    index=seg,
                    start_ticks=start,
                    stop_ticks=stop,
                    spikes=spikes,
                    event_ticks=ticks,
                    event_words=words,
                )
            )
        spec = str(reader._nev_spec)
        notes.insert(0, f"NEV spec {spec}")
        return Recording(rate, channels, tuple(segments), source=str(nev))

    def _open(self, nev: Path, notes: list[str]) -> BlackrockRawIO:
        base = str(nev.with_suffix(""))
        attempts: list[list[int] | None] = [None, []] if self.load_nsx else [[]]
        error: Exception | None = None
        for nsx in attempts:
            try:
                reader = BlackrockRawIO(filename=base, nsx_to_load=nsx)
                reader.parse_header()
            except (NeoReadWriteError, ValueError, IndexError) as exc:
                error = exc
                notes.append(f"nsX files not usable, reading the .nev alone: {exc}")
                continue
            except OSError as exc:
                raise AcquisitionError(f"cannot read {nev}: {exc}") from exc
            return reader
        raise AcquisitionError(f"neo cannot read {nev}: {error}") from error


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    notes = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if "No nsX available" not in text:
            notes.append(f"neo: {text}")
    return notes


def _nev_path(path: Path) -> Path:
    path = Path(path)
    candidates = [path] if path.suffix.lower() == ".nev" else []
    candidates += [path.with_suffix(".nev"), path.with_suffix(".NEV")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if path.is_file():
        raise AcquisitionError(
            f"{path} is not a .nev file; spikes and digital words come from the .nev "
            f"(no {path.with_suffix('.nev').name} beside it)"
        )
    raise AcquisitionError(f"no recording at {path}")
