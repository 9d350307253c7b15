"""A writer of Blackrock NEV files (spec 2.3): basic header, extended headers, spike and
digital-event packets, and clock resets between segments.

Synthetic and replayed sessions go through this writer, so the reader under test is neo's own
``BlackrockIO`` on a real-format file. Layout as in the NEV 2.3 specification (Blackrock
"NEV and NSx File Specification", rev. 2.3): a 336-byte basic header, 32-byte extended headers,
then fixed-size little-endian data packets sorted by timestamp within each segment.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from itloop.rig_client.errors import AcquisitionError

WAVEFORM_SAMPLES = 48
PACKET_BYTES = 8 + 2 * WAVEFORM_SAMPLES
TICK_RATE_HZ = 30_000
RESET_COMMENT = b"critical load restart"
END_COMMENT = b"itloop end of segment"
_DIGITAL_INPUT_CHANGED = 1

_BASIC_HEADER = np.dtype(
    [
        ("file_type_id", "S8"),
        ("ver_major", "u1"),
        ("ver_minor", "u1"),
        ("additional_flags", "<u2"),
        ("bytes_in_headers", "<u4"),
        ("bytes_in_data_packets", "<u4"),
        ("timestamp_resolution", "<u4"),
        ("sample_resolution", "<u4"),
        ("time_origin", "<u2", (8,)),
        ("application", "S32"),
        ("comment", "S256"),
        ("nb_ext_headers", "<u4"),
    ]
)
_EXT_HEADER_BYTES = 32
_SPIKE = np.dtype(
    [
        ("timestamp", "<u4"),
        ("packet_id", "<u2"),
        ("unit", "u1"),
        ("reserved", "u1"),
        ("waveform", "<i2", (WAVEFORM_SAMPLES,)),
    ]
)
_DIGITAL = np.dtype(
    [
        ("timestamp", "<u4"),
        ("packet_id", "<u2"),
        ("reason", "u1"),
        ("reserved", "u1"),
        ("digital_input", "<u2"),
        ("unused", "V", PACKET_BYTES - 10),
    ]
)
_COMMENT = np.dtype(
    [
        ("timestamp", "<u4"),
        ("packet_id", "<u2"),
        ("char_set", "u1"),
        ("flag", "u1"),
        ("data", "<u4"),
        ("text", "S", PACKET_BYTES - 12),
    ]
)
_TEMPLATE = np.round(
    -400 * np.exp(-0.5 * ((np.arange(WAVEFORM_SAMPLES) - 12) / 2.0) ** 2)
    + 150 * np.exp(-0.5 * ((np.arange(WAVEFORM_SAMPLES) - 20) / 5.0) ** 2)
).astype("<i2")


@dataclass(frozen=True)
class NevSegment:
    """One segment's spikes per electrode and digital words, in ticks of its own clock.

    ``stop_ticks`` (exclusive), when given, is marked with a comment packet at ``stop_ticks - 1``
    so that a reader sees the recording run that long even if nothing happened at the end.
    """

    spikes: Mapping[int, Sequence[int] | NDArray[np.int64]]
    event_ticks: Sequence[int] | NDArray[np.int64] = ()
    event_words: Sequence[int] | NDArray[np.int64] = ()
    stop_ticks: int | None = None


@dataclass(frozen=True)
class NevHeader:
    channels: Sequence[int]
    tick_rate_hz: int = TICK_RATE_HZ
    labels: Mapping[int, str] = field(default_factory=dict)
    comment: str = ""
    application: str = "itloop rig_client"
    time_origin: dt.datetime = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    digitization_nv: int = 250


def _ext(packet_id: bytes, body: bytes) -> bytes:
    if len(body) != _EXT_HEADER_BYTES - 8:
        raise ValueError(f"extended header {packet_id!r} body is {len(body)} bytes, not 24")
    return packet_id.ljust(8, b"\x00") + body


def _extended_headers(header: NevHeader) -> list[bytes]:
    out = []
    for electrode in header.channels:
        wav = np.zeros(
            1,
            dtype=[
                ("electrode_id", "<u2"),
                ("physical_connector", "u1"),
                ("connector_pin", "u1"),
                ("digitization_factor", "<u2"),
                ("energy_threshold", "<u2"),
                ("hi_threshold", "<i2"),
                ("lo_threshold", "<i2"),
                ("nb_sorted_units", "u1"),
                ("bytes_per_waveform", "u1"),
                ("spike_width", "<u2"),
                ("unused", "V8"),
            ],
        )
        wav["electrode_id"] = electrode
        wav["physical_connector"] = 1 + (electrode - 1) // 32
        wav["connector_pin"] = 1 + (electrode - 1) % 32
        wav["digitization_factor"] = header.digitization_nv
        wav["lo_threshold"] = -200
        wav["bytes_per_waveform"] = 2
        wav["spike_width"] = WAVEFORM_SAMPLES
        out.append(_ext(b"NEUEVWAV", wav.tobytes()))
        label = header.labels.get(electrode, f"elec{electrode}").encode("ascii")[:16]
        out.append(
            _ext(
                b"NEUEVLBL", np.uint16(electrode).tobytes() + label.ljust(16, b"\x00") + b"\x00" * 6
            )
        )
        flt = np.zeros(
            1,
            dtype=[
                ("electrode_id", "<u2"),
                ("hi_corner", "<u4"),
                ("hi_order", "<u4"),
                ("hi_type", "<u2"),
                ("lo_corner", "<u4"),
                ("lo_order", "<u4"),
                ("lo_type", "<u2"),
                ("unused", "V2"),
            ],
        )
        flt["electrode_id"] = electrode
        flt["hi_corner"] = 250_000
        flt["hi_order"] = 4
        flt["hi_type"] = 1
        flt["lo_corner"] = 7_500_000
        flt["lo_order"] = 3
        flt["lo_type"] = 1
        out.append(_ext(b"NEUEVFLT", flt.tobytes()))
    out.append(_ext(b"DIGLABEL", b"digin".ljust(16, b"\x00") + b"\x01" + b"\x00" * 7))
    return out


def _segment_packets(
    segment: NevSegment, index: int, channels: set[int]
) -> tuple[NDArray[np.int64], list[bytes]]:
    """(timestamps, packets) of one segment, not yet sorted."""
    stamps: list[NDArray[np.int64]] = []
    blobs: list[NDArray[np.void]] = []
    for electrode, raw in segment.spikes.items():
        if electrode not in channels:
            raise AcquisitionError(
                f"segment {index}: spikes on electrode {electrode}, not declared"
            )
        ticks = np.asarray(raw, dtype=np.int64)
        packets = np.zeros(ticks.size, dtype=_SPIKE)
        packets["timestamp"] = ticks
        packets["packet_id"] = electrode
        packets["waveform"] = _TEMPLATE
        stamps.append(ticks)
        blobs.append(packets.view(f"V{PACKET_BYTES}"))
    ticks = np.asarray(segment.event_ticks, dtype=np.int64)
    words = np.asarray(segment.event_words, dtype=np.int64)
    if ticks.shape != words.shape:
        raise AcquisitionError(f"segment {index}: {words.size} words for {ticks.size} event ticks")
    if words.size and (words.min() < 0 or words.max() > 0xFFFF):
        bad = words[(words < 0) | (words > 0xFFFF)][0]
        raise AcquisitionError(f"segment {index}: event word {bad} does not fit 16 bits")
    events = np.zeros(ticks.size, dtype=_DIGITAL)
    events["timestamp"] = ticks
    events["reason"] = _DIGITAL_INPUT_CHANGED
    events["digital_input"] = words
    stamps.append(ticks)
    blobs.append(events.view(f"V{PACKET_BYTES}"))
    comments: list[tuple[int, bytes]] = []
    if index > 0:
        comments.append((0, RESET_COMMENT))
    if segment.stop_ticks is not None:
        comments.append((segment.stop_ticks - 1, END_COMMENT))
    for tick, text in comments:
        packet = np.zeros(1, dtype=_COMMENT)
        packet["timestamp"] = tick
        packet["packet_id"] = 0xFFFF
        packet["text"] = text
        stamps.append(np.asarray([tick], dtype=np.int64))
        blobs.append(packet.view(f"V{PACKET_BYTES}"))
    all_ticks = np.concatenate(stamps)
    if all_ticks.size and (all_ticks.min() < 0 or all_ticks.max() > 0xFFFFFFFF):
        raise AcquisitionError(
            f"segment {index}: ticks span [{all_ticks.min()}, {all_ticks.max()}], "
            "outside the 32-bit timestamps of NEV 2.3"
        )
    if segment.stop_ticks is not None and all_ticks.size and all_ticks.max() >= segment.stop_ticks:
        raise AcquisitionError(
            f"segment {index}: a packet at tick {all_ticks.max()} is not before stop_ticks "
            f"{segment.stop_ticks}"
        )
    # a comment sorts first at equal ticks, so a reset comment opens its segment
    packets_all = np.concatenate(blobs)
    kinds = np.concatenate(
        [np.ones(s.size, dtype=np.int64) for s in stamps[: len(stamps) - len(comments)]]
        + [np.zeros(1, dtype=np.int64) for _ in comments]
    )
    order = np.lexsort((kinds, all_ticks))
    return all_ticks[order], [packets_all[order].tobytes()]


def write_nev(
    path: str | os.PathLike[str], header: NevHeader, segments: Sequence[NevSegment]
) -> Path:
    """Write ``segments`` to ``path`` as a NEV 2.3 file; returns the path.

    Each segment after the first starts with a "critical load restart" comment at tick 0, the
    way Central marks a clock reset, so readers split the file into the same segments.
    """
    if not segments:
        raise AcquisitionError("a NEV file needs at least one segment")
    channels = [int(c) for c in header.channels]
    if len(set(channels)) != len(channels) or any(not 1 <= c <= 2048 for c in channels):
        raise AcquisitionError(f"electrode ids {channels[:10]} must be unique and in 1..2048")
    ext = _extended_headers(header)
    basic = np.zeros(1, dtype=_BASIC_HEADER)
    basic["file_type_id"] = b"NEURALEV"
    basic["ver_major"], basic["ver_minor"] = 2, 3
    basic["additional_flags"] = 1  # bit 0: every spike waveform is 16-bit
    basic["bytes_in_headers"] = _BASIC_HEADER.itemsize + _EXT_HEADER_BYTES * len(ext)
    basic["bytes_in_data_packets"] = PACKET_BYTES
    basic["timestamp_resolution"] = header.tick_rate_hz
    basic["sample_resolution"] = header.tick_rate_hz
    t = header.time_origin.astimezone(dt.UTC)
    basic["time_origin"] = (
        t.year,
        t.month,
        t.isoweekday() % 7,
        t.day,
        t.hour,
        t.minute,
        t.second,
        t.microsecond // 1000,
    )
    basic["application"] = header.application.encode("ascii", "replace")[:31]
    basic["comment"] = header.comment.encode("ascii", "replace")[:255]
    basic["nb_ext_headers"] = len(ext)
    target = Path(path)
    partial = target.with_name(target.name + ".part")
    with open(partial, "wb") as out:
        out.write(basic.tobytes())
        out.write(b"".join(ext))
        for index, segment in enumerate(segments):
            _ticks, blobs = _segment_packets(segment, index, set(channels))
            for blob in blobs:
                out.write(blob)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, target)
    return target
