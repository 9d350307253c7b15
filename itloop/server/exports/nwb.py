"""One recording session as an NWB file (pynwb), written to a temporary file and renamed.

Layout of the file:

- ``general/subject``: the subject; ``general/devices`` + ``electrode_groups``: one per array.
- ``general/extracellular_ephys/electrodes``: one row per session site, in ascending site id
  (the order of ``responses.counts``), with ``site_id``, ``electrode``, ``acq_channel``.
- ``intervals/presentations`` (TimeIntervals): one row per presentation that has an onset marker,
  in onset order. ``start_time`` = onset (acquisition clock, photodiode-corrected where a delay was
  measured) in seconds from the start of the recording; ``stop_time`` = start + the protocol's
  on time. Columns name the stimulus (id, sha256 of its 8-bit PNG in the artifact store, kind,
  ε requested/realised, sign, targeted site), the rig's observations (fixation, frame drops,
  validity, window completeness) and **``spike_counts``**: an (n_presentations, n_sites) int32
  column, column j being electrodes row j, counting threshold crossings in
  [window_start_ms, window_end_ms) after onset; rows without a response hold -1 and
  ``has_response`` False.
- ``analysis/stimuli``: every stimulus of the batch with its parent (clean) image, the generating
  model's predictions f(x), f(x+δ), and the image's sha256 (images are referenced by hash, not
  embedded).
- ``analysis/model_versions``: the generating model version and its lineage back to day 0.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hdmf.common import DynamicTable, VectorData
from numpy.typing import NDArray
from pynwb import NWBHDF5IO, NWBFile
from pynwb.epoch import TimeIntervals
from pynwb.file import Subject as NWBSubject
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from itloop import __version__
from itloop.server.db.tables import (
    Batch,
    ElectrodeArray,
    ModelVersion,
    RecordingSession,
    RecordingSite,
    Subject,
    User,
)
from itloop.server.errors import Conflict
from itloop.server.exports.trials import SessionArrays, load_session
from itloop.server.sessions import get_session

__all__ = [
    "PRESENTATIONS",
    "SPIKE_COUNTS",
    "nwb_response",
    "read_spike_counts",
    "write_session_nwb",
]

PRESENTATIONS = "presentations"
SPIKE_COUNTS = "spike_counts"
_SEX = {"M": "M", "F": "F", "U": "U", "O": "O"}


def write_session_nwb(db: Session, session_id: int, target: Path) -> Path:
    """Write session ``session_id`` to ``target`` atomically; returns ``target``.

    Refuses (Conflict) a session without a published batch or without any recorded onset. The
    file appears only complete: it is written next to ``target`` under a temporary name and
    renamed.
    """
    session = get_session(db, session_id)
    batch = db.scalar(select(Batch).where(Batch.session_id == session.id))
    if batch is None or batch.published_at is None:
        raise Conflict(
            f"session {session_id} has no published batch; there is nothing to export",
            field="session_id",
            value=session_id,
        )
    arrays = load_session(db, session_id)
    if not bool((arrays.has_onset & (arrays.tick_rate_hz > 0)).any()):
        raise Conflict(
            f"session {session_id} has no presentation with an onset marker uploaded yet; "
            "there is nothing to export",
            field="session_id",
            value=session_id,
        )
    nwbfile = _build(db, session, batch, arrays)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.stem}.partial-", suffix=".nwb"
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with NWBHDF5IO(str(tmp), mode="w") as io:
            io.write(nwbfile)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def nwb_response(db: Session, session_id: int) -> FileResponse:
    """The session's NWB file, written to a private temporary directory that is removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="itloop-nwb-"))
    try:
        path = write_session_nwb(db, session_id, workdir / f"itloop-session-{session_id}.nwb")
    except BaseException:
        _remove(workdir)
        raise
    return FileResponse(
        path,
        media_type="application/x-nwb",
        filename=path.name,
        background=BackgroundTask(_remove, workdir),
    )


def _remove(workdir: Path) -> None:
    for child in workdir.iterdir():
        child.unlink(missing_ok=True)
    workdir.rmdir()


def read_spike_counts(path: Path) -> tuple[NDArray[np.int64], list[int], NDArray[np.int32]]:
    """(P,) presentation ids, the N site ids and the (P, N) counts stored in an exported file."""
    with NWBHDF5IO(str(path), mode="r") as io:
        nwbfile = io.read()
        table = nwbfile.intervals[PRESENTATIONS]
        ids = np.asarray(table["presentation_id"].data[:], dtype=np.int64)
        counts = np.asarray(table[SPIKE_COUNTS].data[:], dtype=np.int32)
        sites = [int(s) for s in nwbfile.electrodes["site_id"].data[:]]
    return ids, sites, counts


def _build(db: Session, session: RecordingSession, batch: Batch, arrays: SessionArrays) -> NWBFile:
    subject = db.get(Subject, session.subject_id)
    protocol = session.protocol
    creator = db.get(User, session.created_by_id) if session.created_by_id else None
    identifier = str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"itloop:session:{session.id}:{batch.manifest_sha256}")
    )
    eps = ", ".join(f"{e:g}" for e in protocol.eps_l2)
    nwbfile = NWBFile(
        session_description=(
            f"itloop session {session.id}: RSVP of clean images and per-site adversarial "
            f"perturbations (L2 budgets {eps}) with model-free controls "
            f"({', '.join(protocol.controls) or 'none'}), {protocol.on_ms:g} ms on / "
            f"{protocol.off_ms:g} ms off at {protocol.size_deg:g} degrees, to a fixating subject"
        ),
        identifier=identifier,
        session_start_time=session.scheduled_for,
        session_id=str(session.id),
        experiment_description=(
            "Closed-loop measurement of the adversarial sensitivity of IT neural sites: the "
            "sign-corrected lower bound of Guo et al. with a model of IT refitted nightly."
        ),
        experimenter=[creator.display_name or creator.email] if creator else None,
        stimulus_notes=(
            f"Stimuli are 8-bit RGB PNG files addressed by their SHA-256 in the itloop artifact "
            f"store (batch manifest {batch.manifest_sha256}); see analysis/stimuli."
        ),
        data_collection=(
            f"Multi-unit threshold crossings counted per site in [{protocol.window_start_ms:g}, "
            f"{protocol.window_end_ms:g}) ms after each onset from the acquisition system's "
            "timestamps; see intervals/presentations, column spike_counts."
        ),
        source_script=f"itloop {__version__}",
        source_script_file_name="itloop/server/exports/nwb.py",
        notes=session.notes or None,
        keywords=["inferior temporal cortex", "adversarial sensitivity", "Utah array", "RSVP"],
    )
    if subject is not None:
        nwbfile.subject = NWBSubject(
            subject_id=subject.name,
            species=subject.species,
            sex=_SEX.get(subject.sex, "U"),
            date_of_birth=(
                dt.datetime.combine(subject.date_of_birth, dt.time(), tzinfo=dt.UTC)
                if subject.date_of_birth
                else None
            ),
            description=subject.notes or f"{subject.species} subject {subject.name}",
        )
    _electrodes(db, nwbfile, arrays.site_ids)
    nwbfile.add_time_intervals(_presentations(arrays, protocol.on_ms))
    nwbfile.add_analysis(_stimuli_table(arrays))
    if session.model_version_id is not None:
        nwbfile.add_analysis(_model_versions(db, session.model_version_id))
    return nwbfile


def _electrodes(db: Session, nwbfile: NWBFile, site_ids: Sequence[int]) -> None:
    rows = db.execute(
        select(RecordingSite, ElectrodeArray)
        .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
        .where(RecordingSite.id.in_(list(site_ids)))
        .order_by(RecordingSite.id)
    ).all()
    groups: dict[int, Any] = {}
    for _site, array in rows:
        if array.id in groups:
            continue
        device = nwbfile.create_device(
            name=f"array_{array.name}",
            description=(
                f"chronically implanted {array.n_channels}-channel array"
                + (f", serial {array.serial}" if array.serial else "")
            ),
        )
        groups[array.id] = nwbfile.create_electrode_group(
            name=array.name,
            description=f"array {array.name} in {array.region}",
            location=array.region,
            device=device,
        )
    nwbfile.add_electrode_column("site_id", "itloop recording site id")
    nwbfile.add_electrode_column("electrode", "electrode index within its array")
    nwbfile.add_electrode_column("acq_channel", "channel id in the acquisition system")
    nwbfile.add_electrode_column("label", "site label in itloop")
    for site, array in rows:
        nwbfile.add_electrode(
            group=groups[array.id],
            location=array.region,
            site_id=site.id,
            electrode=site.electrode,
            acq_channel=site.acq_channel,
            label=site.label or f"{array.name}:{site.electrode}",
        )


def _column(name: str, description: str, data: Any) -> VectorData:
    return VectorData(name=name, description=description, data=data)


def _presentations(arrays: SessionArrays, on_ms: float) -> TimeIntervals:
    shown = np.flatnonzero(arrays.has_onset & (arrays.tick_rate_hz > 0))
    onset_ticks = arrays.onset_ticks[shown] + arrays.photodiode_delay_ticks[shown]
    start = onset_ticks.astype(np.float64) / arrays.tick_rate_hz[shown].astype(np.float64)
    order = shown[np.argsort(start, kind="stable")]
    start = np.sort(start, kind="stable")
    stim = [arrays.stimuli[int(s)] for s in arrays.stimulus_id[order]]
    site_row = {site: j for j, site in enumerate(arrays.site_ids)}

    def eps(values: list[float | None]) -> NDArray[np.float64]:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    columns = [
        _column("start_time", "onset, seconds from the start of the recording", start),
        _column("stop_time", "offset (onset + on time), seconds", start + on_ms / 1000.0),
        _column("presentation_id", "itloop presentation id", arrays.presentation_id[order]),
        _column("seq", "position in the session's planned order", arrays.seq[order]),
        _column("trial_index", "fixation trial of this presentation", arrays.trial_index[order]),
        _column("event_code", "digital word sent at onset", arrays.event_code[order]),
        _column(
            "onset_ticks",
            "onset in acquisition clock ticks (before photodiode correction)",
            arrays.onset_ticks[order],
        ),
        _column("tick_rate_hz", "acquisition clock rate", arrays.tick_rate_hz[order]),
        _column("stimulus_id", "itloop stimulus id", np.array([s.id for s in stim])),
        _column(
            "stimulus_sha256",
            "SHA-256 of the stimulus PNG in the itloop artifact store",
            [s.sha256 for s in stim],
        ),
        _column(
            "stimulus_kind",
            "clean, attack (model-based), noise or interpolation (model-free controls)",
            [s.kind.value for s in stim],
        ),
        _column(
            "parent_stimulus_id",
            "the clean stimulus a derived stimulus was made from; its own id for a clean one",
            np.array([s.parent_id if s.parent_id is not None else s.id for s in stim]),
        ),
        _column(
            "eps_requested_l2",
            "requested L2 budget in [0, 1] RGB space; NaN for clean images",
            eps([s.eps_requested_l2 for s in stim]),
        ),
        _column(
            "eps_realised_l2",
            "L2 norm of the perturbation after 8-bit quantisation; NaN for clean images",
            eps([s.eps_realised_l2 for s in stim]),
        ),
        _column(
            "sign",
            "direction the attack pushed the targeted site: +1 up, -1 down, 0 not an attack",
            np.array([s.sign or 0 for s in stim], dtype=np.int8),
        ),
        _column(
            "targeted_site_id",
            "itloop site id the stimulus was made for; -1 if none",
            np.array([s.site_id if s.site_id is not None else -1 for s in stim]),
        ),
        _column(
            "targeted_electrode",
            "row of the electrodes table of the targeted site; -1 if none or not recorded",
            np.array([site_row.get(s.site_id, -1) if s.site_id else -1 for s in stim]),
        ),
        _column("fixation_ok", "the subject kept fixation", arrays.fixation_ok[order]),
        _column(
            "frame_drops", "display frames dropped during the stimulus", arrays.frame_drops[order]
        ),
        _column("valid", "the rig marked the presentation usable", arrays.valid[order]),
        _column("has_response", "spike counts were uploaded", arrays.has_response[order]),
        _column(
            "complete_window",
            "the counting window lay entirely within the recording",
            arrays.complete[order],
        ),
        _column(
            SPIKE_COUNTS,
            f"threshold crossings in [{arrays.window_start_ms}, {arrays.window_end_ms}) ms after "
            "onset; shape (n_presentations, n_sites), column j is electrodes row j; -1 where "
            "has_response is False",
            arrays.counts[order],
        ),
    ]
    return TimeIntervals(
        name=PRESENTATIONS,
        description=(
            "Every presentation with an onset marker, in onset order, with the spike counts of "
            "every recorded site"
        ),
        columns=columns,
    )


def _stimuli_table(arrays: SessionArrays) -> DynamicTable:
    stim = list(arrays.stimuli.values())

    def floats(values: list[float | None]) -> NDArray[np.float64]:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    columns = [
        _column("stimulus_id", "itloop stimulus id", np.array([s.id for s in stim])),
        _column(
            "sha256", "SHA-256 of the 8-bit PNG in the artifact store", [s.sha256 for s in stim]
        ),
        _column("kind", "clean, attack, noise or interpolation", [s.kind.value for s in stim]),
        _column(
            "parent_stimulus_id",
            "clean stimulus a derived one was made from; its own id for a clean one",
            np.array([s.parent_id if s.parent_id is not None else s.id for s in stim]),
        ),
        _column(
            "targeted_site_id",
            "site the stimulus was made for; -1 if none",
            np.array([s.site_id if s.site_id is not None else -1 for s in stim]),
        ),
        _column(
            "eps_requested_l2",
            "requested L2 budget; NaN for clean",
            floats([s.eps_requested_l2 for s in stim]),
        ),
        _column(
            "eps_realised_l2",
            "L2 norm after quantisation; NaN for clean",
            floats([s.eps_realised_l2 for s in stim]),
        ),
        _column(
            "predicted_clean",
            "generating model's prediction f(x) for the clean image; NaN where not recorded",
            floats([s.predicted_clean for s in stim]),
        ),
        _column(
            "predicted_perturbed",
            "generating model's prediction f(x+δ); NaN where not recorded",
            floats([s.predicted_perturbed for s in stim]),
        ),
        _column(
            "model_version_id",
            "model version that generated the stimulus; -1 for clean images",
            np.array([s.model_version_id or -1 for s in stim]),
        ),
    ]
    return DynamicTable(
        name="stimuli",
        description="Every stimulus of the session's batch, referenced by the hash of its image",
        columns=columns,
    )


def _model_versions(db: Session, version_id: int) -> DynamicTable:
    chain: list[ModelVersion] = []
    seen: set[int] = set()
    current: int | None = version_id
    while current is not None and current not in seen:
        seen.add(current)
        version = db.get(ModelVersion, current)
        if version is None:
            break
        chain.append(version)
        current = version.parent_id
    columns = [
        _column("model_version_id", "itloop model version id", np.array([v.id for v in chain])),
        _column(
            "parent_id",
            "the version it was refitted from; -1 for day 0",
            np.array([v.parent_id if v.parent_id is not None else -1 for v in chain]),
        ),
        _column("backbone", "registered backbone", [v.backbone for v in chain]),
        _column("layer", "layer the readout reads", [v.layer for v in chain]),
        _column(
            "checkpoint_sha256", "SHA-256 of the checkpoint", [v.checkpoint_sha256 for v in chain]
        ),
        _column(
            "training_data_fingerprint",
            "SHA-256 of the training data",
            [v.training_data_fingerprint for v in chain],
        ),
        _column(
            "n_trials", "training (image, response) pairs", np.array([v.n_trials for v in chain])
        ),
        _column(
            "created_at", "ISO 8601 time of the fit", [v.created_at.isoformat() for v in chain]
        ),
    ]
    return DynamicTable(
        name="model_versions",
        description=(
            "The model version that generated this session's attacks (first row) and its "
            "ancestors back to day 0"
        ),
        columns=columns,
    )
