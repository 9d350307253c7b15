"""Session pages: the list and calendar, one session's live status, cancel and re-generate."""

from __future__ import annotations

import calendar
import datetime as dt
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop.server import sessions as service
from itloop.server.auth import DbSession
from itloop.server.db.tables import (
    Batch,
    ElectrodeArray,
    Job,
    JobState,
    Protocol,
    RecordingSession,
    RecordingSite,
    Rig,
    SessionState,
    Subject,
)
from itloop.server.errors import ItloopError
from itloop.server.exports.nwb import nwb_response
from itloop.server.exports.trials import load_session
from itloop.server.ui.quality import coverage, site_quality
from itloop.server.ui.rendering import (
    LIVE_STATES,
    ViewerDep,
    forbidden,
    not_found,
    render,
)

router = APIRouter()
UNFINISHED_JOBS = (JobState.queued, JobState.running)


def _parse_date(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _filters(request: Request) -> dict[str, Any]:
    q = request.query_params

    def as_id(name: str) -> int | None:
        raw = q.get(name, "")
        return int(raw) if raw.isdigit() and 0 < int(raw) < 2**63 else None

    state = q.get("state", "")
    return {
        "subject_id": as_id("subject_id"),
        "rig_id": as_id("rig_id"),
        "state": state if state in SessionState.__members__ else "",
        "since": _parse_date(q.get("since")),
        "until": _parse_date(q.get("until")),
    }


def _query_sessions(db: Session, filters: dict[str, Any]) -> list[RecordingSession]:
    query = select(RecordingSession).order_by(
        RecordingSession.scheduled_for.desc(), RecordingSession.id.desc()
    )
    if filters["subject_id"]:
        query = query.where(RecordingSession.subject_id == filters["subject_id"])
    if filters["rig_id"]:
        query = query.where(RecordingSession.rig_id == filters["rig_id"])
    if filters["state"]:
        query = query.where(RecordingSession.state == SessionState(filters["state"]))
    if filters["since"]:
        since = dt.datetime.combine(filters["since"], dt.time(), tzinfo=dt.UTC)
        query = query.where(RecordingSession.scheduled_for >= since)
    if filters["until"]:
        until = dt.datetime.combine(filters["until"], dt.time(), tzinfo=dt.UTC)
        query = query.where(RecordingSession.scheduled_for < until + dt.timedelta(days=1))
    return list(db.scalars(query.limit(500)))


def latest_jobs(db: Session, session_ids: list[int]) -> dict[int, Job]:
    """The newest job of each session (generation, usually)."""
    if not session_ids:
        return {}
    jobs: dict[int, Job] = {}
    for job in db.scalars(select(Job).where(Job.session_id.in_(session_ids)).order_by(Job.id)):
        if job.session_id is not None:
            jobs[job.session_id] = job
    return jobs


def _rows_context(db: Session, filters: dict[str, Any]) -> dict[str, Any]:
    sessions = _query_sessions(db, filters)
    return {
        "sessions": sessions,
        "jobs": latest_jobs(db, [s.id for s in sessions]),
        "live": any(s.state in LIVE_STATES for s in sessions),
        "filters": filters,
        "query": _query_string(filters),
    }


def _query_string(filters: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in filters.items() if v]
    return "&".join(parts)


@router.get("/", include_in_schema=False)
def index(_viewer: ViewerDep) -> Response:
    return RedirectResponse("/sessions", status_code=303)


@router.get("/sessions", response_class=HTMLResponse)
def sessions_page(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    filters = _filters(request)
    view = "calendar" if request.query_params.get("view") == "calendar" else "list"
    context = _rows_context(db, filters)
    context.update(
        view=view,
        subjects=list(db.scalars(select(Subject).order_by(Subject.name))),
        rigs=list(db.scalars(select(Rig).order_by(Rig.name))),
        states=[s.value for s in SessionState],
    )
    if view == "calendar":
        context.update(_calendar(db, request, filters))
    return render(request, "sessions.html", viewer, **context)


@router.get("/sessions/rows", response_class=HTMLResponse)
def session_rows(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    """The list's table body alone: what the page polls for live states and progress."""
    return render(request, "_session_rows.html", viewer, **_rows_context(db, _filters(request)))


def _calendar(db: Session, request: Request, filters: dict[str, Any]) -> dict[str, Any]:
    raw = request.query_params.get("month", "")
    try:
        first = dt.date.fromisoformat(raw + "-01") if raw else dt.date.today().replace(day=1)
    except ValueError:
        first = dt.date.today().replace(day=1)
    last_day = calendar.monthrange(first.year, first.month)[1]
    month_filters = dict(filters, since=first, until=first.replace(day=last_day))
    by_day: dict[dt.date, list[RecordingSession]] = defaultdict(list)
    for s in _query_sessions(db, month_filters):
        by_day[s.scheduled_for.date()].append(s)
    weeks = calendar.Calendar(firstweekday=0).monthdatescalendar(first.year, first.month)
    previous = (first - dt.timedelta(days=1)).replace(day=1)
    following = first.replace(day=last_day) + dt.timedelta(days=1)
    return {
        "month": first,
        "weeks": weeks,
        "by_day": by_day,
        "previous_month": previous.strftime("%Y-%m"),
        "next_month": following.strftime("%Y-%m"),
        "today": dt.date.today(),
    }


def _session_or_none(db: Session, session_id: int) -> RecordingSession | None:
    return db.get(RecordingSession, session_id) if 0 < session_id < 2**63 else None


def _site_labels(db: Session, site_ids: list[int]) -> dict[int, str]:
    rows = db.execute(
        select(RecordingSite.id, RecordingSite.label, RecordingSite.electrode, ElectrodeArray.name)
        .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
        .where(RecordingSite.id.in_(site_ids))
    ).all()
    return {sid: label or f"{array}:{electrode}" for sid, label, electrode, array in rows}


def _live_context(db: Session, session: RecordingSession) -> dict[str, Any]:
    batch = db.scalar(select(Batch).where(Batch.session_id == session.id))
    job = latest_jobs(db, [session.id]).get(session.id)
    protocol = db.get(Protocol, session.protocol_id)
    context: dict[str, Any] = {
        "session": session,
        "batch": batch,
        "job": job,
        "live": session.state in LIVE_STATES,
        "coverage": None,
        "quality": [],
    }
    if batch is not None and protocol is not None:
        arrays = load_session(db, session.id)
        context["coverage"] = coverage(
            arrays, planned=batch.n_presentations, repeats_wanted=protocol.repeats
        )
        if arrays.has_response.any():
            window = (
                (arrays.window_end_ms - arrays.window_start_ms)
                if arrays.window_start_ms is not None and arrays.window_end_ms is not None
                else None
            )
            context["quality"] = site_quality(arrays, _site_labels(db, arrays.site_ids), window)
    return context


def _actions(db: Session, session: RecordingSession) -> dict[str, bool]:
    has_batch = db.scalar(select(Batch.id).where(Batch.session_id == session.id)) is not None
    allowed = service.TRANSITIONS[session.state]
    return {
        "can_cancel": SessionState.cancelled in allowed,
        "can_regenerate": SessionState.scheduled in allowed and not has_batch,
    }


@router.get("/sessions/{session_id:int}", response_class=HTMLResponse)
def session_page(request: Request, session_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    session = _session_or_none(db, session_id)
    if session is None:
        return not_found(request, viewer, f"session {session_id}")
    context = _live_context(db, session)
    site_ids = sorted(s.site_id for s in session.sites)
    context.update(
        _actions(db, session),
        protocol=db.get(Protocol, session.protocol_id),
        subject=db.get(Subject, session.subject_id),
        rig=db.get(Rig, session.rig_id),
        site_labels=_site_labels(db, site_ids),
        site_ids=site_ids,
    )
    return render(request, "session.html", viewer, **context)


@router.get("/sessions/{session_id:int}/live", response_class=HTMLResponse)
def session_live(request: Request, session_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    session = _session_or_none(db, session_id)
    if session is None:
        return not_found(request, viewer, f"session {session_id}")
    return render(request, "_session_live.html", viewer, **_live_context(db, session))


_ACTIONS = {
    "cancel": (
        "Cancel",
        "Cancelling stops its generation job and the session can never run. This cannot be undone.",
    ),
    "regenerate": (
        "Re-generate",
        "The session goes back to 'scheduled' and a new generation job is queued with the "
        "current model version.",
    ),
}


def _action_allowed(db: Session, session: RecordingSession, action: str) -> bool:
    flags = _actions(db, session)
    return flags["can_cancel"] if action == "cancel" else flags["can_regenerate"]


def confirm_action(
    request: Request, session_id: int, action: str, viewer: ViewerDep, db: DbSession
) -> Response:
    session = _session_or_none(db, session_id)
    if session is None or action not in _ACTIONS:
        return not_found(request, viewer, f"session {session_id} / {action}")
    if not viewer.can_write:
        return forbidden(request, viewer, f"{action} sessions")
    title, explanation = _ACTIONS[action]
    return render(
        request,
        "confirm.html",
        viewer,
        session=session,
        action=action,
        title=title,
        explanation=explanation,
        allowed=_action_allowed(db, session, action),
    )


def do_action(
    request: Request, session_id: int, action: str, viewer: ViewerDep, db: DbSession
) -> Response:
    session = _session_or_none(db, session_id)
    if session is None or action not in _ACTIONS:
        return not_found(request, viewer, f"session {session_id} / {action}")
    if not viewer.can_write:
        return forbidden(request, viewer, f"{action} sessions")
    title, explanation = _ACTIONS[action]
    if not _action_allowed(db, session, action):
        return render(
            request,
            "confirm.html",
            viewer,
            status_code=409,
            session=session,
            action=action,
            title=title,
            explanation=explanation,
            allowed=False,
        )
    jobs = getattr(request.app.state, "jobs", None)
    try:
        if action == "cancel":
            for job in db.scalars(
                select(Job).where(Job.session_id == session.id, Job.state.in_(UNFINISHED_JOBS))
            ):
                if jobs is not None:
                    jobs.cancel(job.id)
            db.expire_all()
            session = service.get_session(db, session_id)
            service.transition(db, session, SessionState.cancelled, actor=viewer.principal)
            db.commit()
        else:
            service.transition(db, session, SessionState.scheduled, actor=viewer.principal)
            db.commit()
            enqueue = getattr(request.app.state, "enqueue_generation", None)
            if enqueue is not None:
                enqueue(session.id)
    except ItloopError as exc:
        db.rollback()
        return render(
            request,
            "confirm.html",
            viewer,
            status_code=exc.status_code,
            session=session,
            action=action,
            title=title,
            explanation=explanation,
            allowed=False,
            error=exc.message,
        )
    notice = "cancelled" if action == "cancel" else "regenerated"
    return RedirectResponse(f"/sessions/{session.id}?notice={notice}", status_code=303)


@router.get("/sessions/{session_id:int}/cancel", response_class=HTMLResponse)
def confirm_cancel(request: Request, session_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    return confirm_action(request, session_id, "cancel", viewer, db)


@router.post("/sessions/{session_id:int}/cancel", response_class=HTMLResponse)
def cancel(request: Request, session_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    return do_action(request, session_id, "cancel", viewer, db)


@router.get("/sessions/{session_id:int}/regenerate", response_class=HTMLResponse)
def confirm_regenerate(
    request: Request, session_id: int, viewer: ViewerDep, db: DbSession
) -> Response:
    return confirm_action(request, session_id, "regenerate", viewer, db)


@router.post("/sessions/{session_id:int}/regenerate", response_class=HTMLResponse)
def regenerate(request: Request, session_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    return do_action(request, session_id, "regenerate", viewer, db)


@router.get("/sessions/{session_id:int}/export.nwb")
def session_nwb(request: Request, session_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    session = _session_or_none(db, session_id)
    if session is None:
        return not_found(request, viewer, f"session {session_id}")
    return nwb_response(db, session_id)
