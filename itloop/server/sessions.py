"""Recording sessions: scheduling and the state machine every session moves through."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop.server import audit
from itloop.server.auth import Principal
from itloop.server.db.tables import (
    ElectrodeArray,
    ModelVersion,
    Protocol,
    RecordingSession,
    RecordingSite,
    Rig,
    SessionSite,
    SessionState,
    Subject,
    TokenKind,
    utcnow,
)
from itloop.server.errors import Conflict, InvalidInput, NotFound, PermissionDenied

S = SessionState
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.scheduled: frozenset({S.generating, S.failed, S.cancelled}),
    S.generating: frozenset({S.ready, S.failed, S.cancelled}),
    S.ready: frozenset({S.running, S.scheduled, S.failed, S.cancelled}),
    S.running: frozenset({S.uploaded, S.failed, S.cancelled}),
    S.uploaded: frozenset({S.analysed, S.failed}),
    S.analysed: frozenset({S.uploaded}),
    S.failed: frozenset({S.scheduled, S.cancelled}),
    S.cancelled: frozenset(),
}
RIG_MAY_SET = frozenset({S.running, S.uploaded})
WORKER_MAY_SET = frozenset({S.generating, S.ready, S.failed, S.analysed, S.uploaded})


def get_session(db: Session, session_id: int) -> RecordingSession:
    session = db.get(RecordingSession, session_id)
    if session is None:
        raise NotFound(f"session {session_id} does not exist", field="session_id", value=session_id)
    return session


def current_model_version(db: Session, subject_id: int) -> ModelVersion | None:
    """The newest model version of a subject (what a session scheduled now is generated with)."""
    return db.scalar(
        select(ModelVersion)
        .where(ModelVersion.subject_id == subject_id)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )


def schedule(
    db: Session,
    *,
    subject_id: int,
    rig_id: int,
    protocol_id: int,
    scheduled_for: object,
    site_ids: list[int] | None,
    notes: str,
    actor: Principal,
) -> RecordingSession:
    """A new session in state ``scheduled`` (the caller enqueues its generation job)."""
    for table, value, field in (
        (Subject, subject_id, "subject_id"),
        (Rig, rig_id, "rig_id"),
        (Protocol, protocol_id, "protocol_id"),
    ):
        if db.get(table, value) is None:
            raise InvalidInput(f"{field} {value} does not exist", field=field, value=value)
    subject_sites = {
        site.id: site
        for site in db.scalars(
            select(RecordingSite)
            .join(ElectrodeArray, RecordingSite.array_id == ElectrodeArray.id)
            .where(ElectrodeArray.subject_id == subject_id)
        )
    }
    if site_ids is None:
        chosen = sorted(i for i, s in subject_sites.items() if s.active)
    else:
        if len(set(site_ids)) != len(site_ids):
            raise InvalidInput(f"site_ids {site_ids} lists a site twice", field="site_ids")
        for site_id in site_ids:
            if site_id not in subject_sites:
                raise InvalidInput(
                    f"site {site_id} is not a recording site of subject {subject_id}",
                    field="site_ids",
                    value=site_id,
                )
            if not subject_sites[site_id].active:
                raise InvalidInput(f"site {site_id} is not active", field="site_ids", value=site_id)
        chosen = sorted(site_ids)
    if not chosen:
        raise InvalidInput(f"subject {subject_id} has no active recording sites", field="site_ids")
    model = current_model_version(db, subject_id)
    session = RecordingSession(
        subject_id=subject_id,
        rig_id=rig_id,
        protocol_id=protocol_id,
        scheduled_for=scheduled_for,
        model_version_id=model.id if model else None,
        created_by_id=actor.user_id,
        notes=notes,
    )
    db.add(session)
    db.flush()
    db.add_all(SessionSite(session_id=session.id, site_id=i) for i in chosen)
    audit.record(db, actor, "session.schedule", "session", session.id, sites=len(chosen))
    return session


def transition(
    db: Session,
    session: RecordingSession,
    to: SessionState,
    *,
    actor: Principal | None,
    reason: str | None = None,
) -> RecordingSession:
    """Move ``session`` to state ``to`` or raise Conflict (409) naming both states."""
    if actor is not None:
        if actor.kind is TokenKind.rig and to not in RIG_MAY_SET:
            raise PermissionDenied(f"a rig may not move a session to {to.value!r}")
        if actor.kind is TokenKind.worker and to not in WORKER_MAY_SET:
            raise PermissionDenied(f"a worker may not move a session to {to.value!r}")
        if actor.kind is TokenKind.user and not actor.can_write:
            raise PermissionDenied("analysts cannot change sessions")
    if to not in TRANSITIONS[session.state]:
        allowed = sorted(s.value for s in TRANSITIONS[session.state]) or ["none"]
        raise Conflict(
            f"session {session.id} is {session.state.value!r}; it cannot become {to.value!r} "
            f"(allowed: {', '.join(allowed)})",
            field="to",
            value=to.value,
        )
    previous = session.state
    session.state = to
    session.state_changed_at = utcnow()
    if to is S.failed:
        session.error = reason or "failed"
    elif to is S.scheduled:
        session.error = None
    audit.record(
        db, actor, "session.transition", "session", session.id, frm=previous.value, to=to.value
    )
    return session
