"""Sessions: scheduling, listing, state transitions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from fastapi import APIRouter, Request
from sqlalchemy import select

from itloop.protocol.sessions import SessionCreate, SessionOut, SessionTransition, SessionUpdate
from itloop.protocol.sessions import SessionState as WireState
from itloop.server import audit
from itloop.server import sessions as service
from itloop.server.api.params import PathId, QueryId
from itloop.server.auth import CurrentPrincipal, DbSession, Reader, Writer, check_rig_access
from itloop.server.db.tables import Job, RecordingSession, SessionState, Stimulus
from itloop.server.errors import Conflict

router = APIRouter(prefix="/sessions", tags=["sessions"])


def to_wire(session: RecordingSession) -> SessionOut:
    return SessionOut(
        id=session.id,
        subject_id=session.subject_id,
        rig_id=session.rig_id,
        protocol_id=session.protocol_id,
        model_version_id=session.model_version_id,
        scheduled_for=session.scheduled_for,
        state=WireState(session.state.value),
        state_changed_at=session.state_changed_at,
        error=session.error,
        notes=session.notes,
        site_ids=sorted(s.site_id for s in session.sites),
        created_at=session.created_at,
    )


@router.get("", response_model=list[SessionOut])
def list_sessions(
    db: DbSession,
    _who: Reader,
    subject_id: QueryId = None,
    rig_id: QueryId = None,
    state: WireState | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[SessionOut]:
    query = select(RecordingSession).order_by(RecordingSession.scheduled_for, RecordingSession.id)
    if subject_id is not None:
        query = query.where(RecordingSession.subject_id == subject_id)
    if rig_id is not None:
        query = query.where(RecordingSession.rig_id == rig_id)
    if state is not None:
        query = query.where(RecordingSession.state == SessionState(state.value))
    if since is not None:
        query = query.where(RecordingSession.scheduled_for >= since)
    if until is not None:
        query = query.where(RecordingSession.scheduled_for < until)
    rows: Sequence[RecordingSession] = db.scalars(query).all()
    return [to_wire(s) for s in rows]


@router.post("", response_model=SessionOut, status_code=201)
def schedule_session(
    body: SessionCreate, request: Request, db: DbSession, who: Writer
) -> SessionOut:
    """Schedule a session; its generation job is enqueued with the current model version."""
    session = service.schedule(
        db,
        subject_id=body.subject_id,
        rig_id=body.rig_id,
        protocol_id=body.protocol_id,
        scheduled_for=body.scheduled_for,
        site_ids=body.site_ids,
        notes=body.notes,
        actor=who,
    )
    db.commit()
    enqueue = getattr(request.app.state, "enqueue_generation", None)
    if enqueue is not None:
        enqueue(session.id)
    db.refresh(session)
    return to_wire(session)


@router.get("/{session_id}", response_model=SessionOut)
def get_session(session_id: PathId, db: DbSession, principal: CurrentPrincipal) -> SessionOut:
    session = service.get_session(db, session_id)
    check_rig_access(principal, session.rig_id, write=False)
    return to_wire(session)


@router.post("/{session_id}/transitions", response_model=SessionOut)
def transition_session(
    session_id: PathId, body: SessionTransition, db: DbSession, principal: CurrentPrincipal
) -> SessionOut:
    """Move a session to another state; an impossible move is 409 naming both states."""
    session = service.get_session(db, session_id)
    check_rig_access(principal, session.rig_id, write=True)
    service.transition(
        db, session, SessionState(body.to.value), actor=principal, reason=body.reason
    )
    db.commit()
    return to_wire(session)


@router.patch("/{session_id}", response_model=SessionOut)
def update_session(
    session_id: PathId, body: SessionUpdate, db: DbSession, who: Writer
) -> SessionOut:
    """Move or annotate a session that has not started generating (else 409)."""
    session = service.get_session(db, session_id)
    if session.state is not SessionState.scheduled:
        raise Conflict(
            f"session {session_id} is {session.state.value!r}; only a scheduled session changes",
            field="session_id",
            value=session_id,
        )
    changes = body.model_dump(exclude_none=True)
    for name, value in changes.items():
        setattr(session, name, value)
    audit.record(db, who, "session.update", "session", session_id, fields=sorted(changes))
    db.commit()
    return to_wire(session)


@router.delete("/{session_id}", status_code=204)
def delete_session(session_id: PathId, db: DbSession, who: Writer) -> None:
    """Delete a scheduled or cancelled session that has no stimuli (else 409: cancel it)."""
    session = service.get_session(db, session_id)
    has_stimuli = db.scalar(select(Stimulus.id).where(Stimulus.session_id == session_id).limit(1))
    deletable = (SessionState.scheduled, SessionState.cancelled, SessionState.failed)
    if session.state not in deletable or has_stimuli is not None:
        raise Conflict(
            f"session {session_id} is {session.state.value!r} with generated stimuli; cancel it "
            "instead (its records are kept)",
            field="session_id",
            value=session_id,
        )
    for job in db.scalars(select(Job).where(Job.session_id == session_id)):
        job.session_id = None
    audit.record(db, who, "session.delete", "session", session_id)
    db.delete(session)
    db.commit()
