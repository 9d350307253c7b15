"""Ingest of a rig's recording: validated chunks, stored whole or not at all, exactly once."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from itloop.protocol.batches import UploadChunk, UploadedPresentation, UploadReceipt
from itloop.server import audit
from itloop.server.auth import Principal
from itloop.server.batches import published_batch
from itloop.server.db.tables import (
    IdempotencyRecord,
    IdempotencyState,
    Presentation,
    RecordingSession,
    Response,
    SessionSite,
    SessionState,
    Stimulus,
    utcnow,
)
from itloop.server.errors import Conflict, InvalidInput

UPLOADABLE_STATES = frozenset({SessionState.running, SessionState.uploaded})
_in_flight: set[tuple[str, str]] = set()
_in_flight_lock = threading.Lock()


@dataclass(frozen=True)
class UploadOutcome:
    receipt: UploadReceipt
    replayed: bool


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@contextmanager
def _claim(scope: str, key: str) -> Iterator[None]:
    with _in_flight_lock:
        if (scope, key) in _in_flight:
            raise Conflict(f"a request with Idempotency-Key {key!r} is still in flight", value=key)
        _in_flight.add((scope, key))
    try:
        yield
    finally:
        with _in_flight_lock:
            _in_flight.discard((scope, key))


def _replay(db: Session, scope: str, key: str, request_sha256: str) -> UploadOutcome | None:
    record = db.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.scope == scope, IdempotencyRecord.key == key
        )
    )
    if record is None:
        return None
    if record.request_sha256 != request_sha256:
        raise InvalidInput(
            f"Idempotency-Key {key!r} was used before with a different body",
            field="Idempotency-Key",
            value=key,
        )
    if record.state is not IdempotencyState.done or record.response_body is None:
        raise Conflict(f"a request with Idempotency-Key {key!r} is still in flight", value=key)
    return UploadOutcome(UploadReceipt.model_validate(record.response_body), replayed=True)


def ingest(
    db: Session,
    session: RecordingSession,
    chunk: UploadChunk,
    *,
    key: str,
    request_sha256: str,
    actor: Principal,
) -> UploadOutcome:
    """Store ``chunk`` for ``session`` once per ``key``; a repeat returns the stored receipt."""
    scope = f"session:{session.id}:upload"
    with _claim(scope, key):
        replay = _replay(db, scope, key, request_sha256)
        if replay is not None:
            return replay
        if session.state not in UPLOADABLE_STATES:
            raise Conflict(
                f"session {session.id} is {session.state.value!r}; uploads need 'running'",
                field="session_id",
                value=session.id,
            )
        try:
            outcome = _store(
                db, session, chunk, scope=scope, key=key, request_sha256=request_sha256
            )
            audit.record(
                db,
                actor,
                "session.upload",
                "session",
                session.id,
                presentations=outcome.receipt.n_presentations,
            )
            db.commit()
        except (IntegrityError, OperationalError, DBAPIError) as exc:
            db.rollback()
            replay = _replay(db, scope, key, request_sha256)
            if replay is not None:
                return replay
            if isinstance(exc, OperationalError) and "lock" in str(exc.orig).lower():
                raise Conflict(
                    f"a request with Idempotency-Key {key!r} is still in flight", value=key
                ) from exc
            raise
        except BaseException:
            db.rollback()
            raise
        return outcome


def _store(
    db: Session,
    session: RecordingSession,
    chunk: UploadChunk,
    *,
    scope: str,
    key: str,
    request_sha256: str,
) -> UploadOutcome:
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SET LOCAL lock_timeout = '250ms'"))
    stored_at = utcnow()
    record = IdempotencyRecord(
        scope=scope, key=key, request_sha256=request_sha256, state=IdempotencyState.in_flight
    )
    db.add(record)
    db.flush()  # a concurrent holder of the same key makes this wait, then fail

    batch = published_batch(db, session)
    session_sites = set(
        db.scalars(select(SessionSite.site_id).where(SessionSite.session_id == session.id))
    )
    _check_sites(chunk, session_sites)
    stimuli = set(db.scalars(select(Stimulus.id).where(Stimulus.session_id == session.id)))
    planned = {
        seq: (pid, stim, code, uploaded)
        for pid, seq, stim, code, uploaded in db.execute(
            select(
                Presentation.id,
                Presentation.seq,
                Presentation.stimulus_id,
                Presentation.event_code,
                Presentation.uploaded_at,
            ).where(Presentation.session_id == session.id)
        )
    }
    codes_in_use = {code for _pid, _stim, code, _up in planned.values()}
    spare_codes = {int(c) for c in batch.spare_event_codes}
    n_sites = len(chunk.site_ids)

    seen: set[int] = set()
    last_onset: int | None = None
    for i, p in enumerate(chunk.presentations):
        where = f"presentations[{i}]"
        if p.seq in seen:
            raise InvalidInput(
                f"{where}: seq {p.seq} appears twice in this chunk",
                field=f"{where}.seq",
                value=p.seq,
            )
        seen.add(p.seq)
        if p.stimulus_id not in stimuli:
            raise InvalidInput(
                f"{where}: stimulus {p.stimulus_id} is not in session {session.id}'s batch",
                field=f"{where}.stimulus_id",
                value=p.stimulus_id,
            )
        if p.seq in planned:
            _pid, stim, code, uploaded = planned[p.seq]
            if uploaded is not None:
                raise InvalidInput(
                    f"{where}: presentation seq {p.seq} was already uploaded",
                    field=f"{where}.seq",
                    value=p.seq,
                )
            if stim != p.stimulus_id or code != p.event_code:
                raise InvalidInput(
                    f"{where}: seq {p.seq} was planned as stimulus {stim} with event code {code}, "
                    f"not stimulus {p.stimulus_id} with code {p.event_code}",
                    field=f"{where}.seq",
                    value=p.seq,
                )
        else:
            if p.event_code not in spare_codes:
                raise InvalidInput(
                    f"{where}: seq {p.seq} is not planned and event code {p.event_code} is not "
                    "one of the batch's spare codes",
                    field=f"{where}.event_code",
                    value=p.event_code,
                )
            if p.event_code in codes_in_use:
                raise InvalidInput(
                    f"{where}: event code {p.event_code} is already used in session {session.id}",
                    field=f"{where}.event_code",
                    value=p.event_code,
                )
            codes_in_use.add(p.event_code)
        if p.onset_ticks is not None:
            if last_onset is not None and p.onset_ticks <= last_onset:
                raise InvalidInput(
                    f"{where}: onset_ticks {p.onset_ticks} is not after the previous onset "
                    f"{last_onset}",
                    field=f"{where}.onset_ticks",
                    value=p.onset_ticks,
                )
            last_onset = p.onset_ticks
        usable = p.valid and p.onset_ticks is not None
        if usable and len(p.counts) != n_sites:
            raise InvalidInput(
                f"{where}: {len(p.counts)} counts for {n_sites} sites",
                field=f"{where}.counts",
                value=len(p.counts),
            )
        if not usable and p.counts and len(p.counts) != n_sites:
            raise InvalidInput(
                f"{where}: {len(p.counts)} counts for {n_sites} sites",
                field=f"{where}.counts",
                value=len(p.counts),
            )
        if p.counts and min(p.counts) < 0:
            j = next(j for j, count in enumerate(p.counts) if count < 0)
            raise InvalidInput(
                f"{where}.counts[{j}] is {p.counts[j]}; spike counts cannot be negative",
                field=f"{where}.counts[{j}]",
                value=p.counts[j],
            )

    new_rows = [
        {
            "session_id": session.id,
            "stimulus_id": p.stimulus_id,
            "seq": p.seq,
            "trial_index": 0,
            "event_code": p.event_code,
            "frame_drops": p.frame_drops,
        }
        for p in chunk.presentations
        if p.seq not in planned
    ]
    if new_rows:
        db.execute(insert(Presentation), new_rows)
        for pid, seq in db.execute(
            select(Presentation.id, Presentation.seq).where(
                Presentation.session_id == session.id,
                Presentation.seq.in_([r["seq"] for r in new_rows]),
            )
        ):
            planned[seq] = (pid, 0, 0, None)
    updates = [
        {
            "id": planned[p.seq][0],
            "onset_ticks": p.onset_ticks,
            "tick_rate_hz": p.tick_rate_hz,
            "photodiode_delay_ticks": p.photodiode_delay_ticks,
            "fixation_ok": p.fixation_ok,
            "frame_drops": p.frame_drops,
            "valid": p.valid and p.onset_ticks is not None,
            "invalid_reason": _invalid_reason(p),
            "uploaded_at": stored_at,
        }
        for p in chunk.presentations
    ]
    db.execute(update(Presentation), updates)
    n_responses = _insert_responses(
        db, chunk, {seq: row[0] for seq, row in planned.items()}, sorted(session_sites)
    )
    receipt = UploadReceipt(
        session_id=session.id,
        chunk_sha256=request_sha256,
        n_presentations=len(chunk.presentations),
        n_responses=n_responses,
        stored_at=stored_at,
    )
    record.state = IdempotencyState.done
    record.status_code = 201
    record.response_body = receipt.model_dump(mode="json")
    return UploadOutcome(receipt, replayed=False)


def pack_counts(counts: Sequence[int]) -> bytes:
    """Counts as little-endian int32, the layout of ``responses.counts``."""
    return np.asarray(counts, dtype="<i4").tobytes()


def unpack_counts(blob: bytes, n_sites: int) -> NDArray[np.int32]:
    values = np.frombuffer(blob, dtype="<i4")
    if values.size != n_sites:
        raise ValueError(f"response holds {values.size} counts, expected {n_sites}")
    return values


def _insert_responses(
    db: Session, chunk: UploadChunk, presentation_ids: dict[int, int], canonical: list[int]
) -> int:
    """One row per presentation, counts reordered to the session's site order; returns the
    number of site counts stored."""
    order = [chunk.site_ids.index(site) for site in canonical]
    rows = []
    for p in chunk.presentations:
        if not p.counts:
            continue
        counts = np.asarray(p.counts, dtype="<i4")[order]
        rows.append(
            {
                "presentation_id": presentation_ids[p.seq],
                "n_sites": len(canonical),
                "counts": counts.tobytes(),
                "window_start_ms": chunk.window_start_ms,
                "window_end_ms": chunk.window_end_ms,
                "complete": p.complete,
            }
        )
    if rows:
        db.execute(insert(Response), rows)
    return len(rows) * len(canonical)


def _invalid_reason(p: UploadedPresentation) -> str | None:
    if not p.valid:
        return p.invalid_reason
    return "no onset marker" if p.onset_ticks is None else None


def _check_sites(chunk: UploadChunk, session_sites: set[int]) -> None:
    if len(set(chunk.site_ids)) != len(chunk.site_ids):
        raise InvalidInput(f"site_ids {chunk.site_ids[:10]}… lists a site twice", field="site_ids")
    for i, site_id in enumerate(chunk.site_ids):
        if site_id not in session_sites:
            raise InvalidInput(
                f"site_ids[{i}]: site {site_id} is not recorded in this session",
                field=f"site_ids[{i}]",
                value=site_id,
            )
    if len(chunk.site_ids) != len(session_sites):
        raise InvalidInput(
            f"{len(chunk.site_ids)} site_ids for a session of {len(session_sites)} sites",
            field="site_ids",
            value=len(chunk.site_ids),
        )
