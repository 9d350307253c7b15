"""One session on the rig, end to end: present, read the recording, count, spool, upload."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from itloop.protocol.batches import BatchManifest, UploadedPresentation
from itloop.rig_client.acquisition import Recording, SpikeSource
from itloop.rig_client.counting import count_presentations, locate_markers, seconds_to_ticks
from itloop.rig_client.errors import AcquisitionError
from itloop.rig_client.presentation import PresentationRecord, Presenter, SessionLog, run_session
from itloop.rig_client.spool import Spool, SpooledPresentation

NOT_SHOWN = "not shown: fixation was lost earlier in its trial"


def counted_presentations(
    manifest: BatchManifest, records: Sequence[PresentationRecord], recording: Recording
) -> list[SpooledPresentation]:
    """The presenter's log joined to the recording's markers and counted per site.

    Sites are in the manifest's order; their acquisition channels must be in the recording.
    """
    shown = [r for r in records if r.shown]
    onsets = dict(
        zip(
            (r.seq for r in shown),
            locate_markers(recording, [r.event_code for r in shown]),
            strict=True,
        )
    )
    channels = [s.acq_channel for s in manifest.sites]
    spikes = recording.spike_counts()
    missing = [c for c in channels if c not in spikes]
    if not missing and shown and not any(spikes[c] for c in channels):
        raise AcquisitionError(
            f"{recording.source or 'the recording'} has no spikes on any of the session's "
            f"channels {channels[:10]}; refusing to spool all-zero counts"
        )
    counted = dict(
        zip(
            onsets,
            count_presentations(
                recording,
                list(onsets.values()),
                window_start_ms=manifest.window_start_ms,
                window_end_ms=manifest.window_end_ms,
                channels=channels,
            ),
            strict=True,
        )
    )
    out = []
    for record in records:
        c = counted.get(record.seq)
        if c is None:
            presentation = UploadedPresentation(
                seq=record.seq,
                stimulus_id=record.stimulus_id,
                event_code=record.event_code,
                onset_ticks=None,
                tick_rate_hz=recording.tick_rate_hz,
                fixation_ok=False,
                frame_drops=record.frame_drops,
                valid=False,
                invalid_reason=NOT_SHOWN,
                counts=[],
            )
            out.append(SpooledPresentation(presentation, None))
            continue
        presentation = UploadedPresentation(
            seq=record.seq,
            stimulus_id=record.stimulus_id,
            event_code=record.event_code,
            onset_ticks=c.onset_ticks if c.valid else None,
            tick_rate_hz=recording.tick_rate_hz,
            photodiode_delay_ticks=c.photodiode_delay_ticks,
            fixation_ok=record.fixation_ok,
            frame_drops=record.frame_drops,
            valid=c.valid,
            invalid_reason=c.invalid_reason,
            complete=c.complete,
            counts=list(c.counts or []),
        )
        out.append(SpooledPresentation(presentation, c.segment))
    return out


def replay_onsets(
    records: Sequence[PresentationRecord], tick_rate_hz: int
) -> tuple[list[int], list[int]]:
    """Onset ticks and event codes of the shown presentations, for a ``Replayer``."""
    shown = [r for r in records if r.shown and r.onset_s is not None]
    return (
        [seconds_to_ticks(r.onset_s or 0.0, tick_rate_hz) for r in shown],
        [r.event_code for r in shown],
    )


def spool_session(
    spool: Spool, manifest: BatchManifest, items: Sequence[SpooledPresentation]
) -> int:
    spool.begin_session(
        manifest.session_id,
        [s.site_id for s in manifest.sites],
        manifest.window_start_ms,
        manifest.window_end_ms,
    )
    return spool.add(manifest.session_id, items)


def present_session(
    manifest: BatchManifest,
    presenter: Presenter,
    spool: Spool,
) -> SessionLog:
    """Present the batch and keep the presenter's log in the spool (for a later ``count``)."""
    log = run_session(manifest, presenter)
    spool.log_presentations(
        manifest.session_id, [(r.seq, r.model_dump_json()) for r in log.records]
    )
    return log


def count_session(
    manifest: BatchManifest,
    spool: Spool,
    source: SpikeSource | Callable[[Sequence[PresentationRecord]], SpikeSource],
) -> int:
    """Count the logged presentations of a session against ``source`` and spool them."""
    records = [
        PresentationRecord.model_validate_json(b)
        for b in spool.presentation_log(manifest.session_id)
    ]
    if not records:
        return 0
    spike_source = source if isinstance(source, SpikeSource) else source(records)
    recording = spike_source.read()
    return spool_session(spool, manifest, counted_presentations(manifest, records, recording))


__all__ = [
    "NOT_SHOWN",
    "count_session",
    "counted_presentations",
    "present_session",
    "replay_onsets",
    "spool_session",
]
