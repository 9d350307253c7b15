"""The sensitivity dashboard: the paper's figures from live data, their CSVs, example images."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from itloop.server import figures
from itloop.server.artifacts import ContentStore
from itloop.server.auth import DbSession
from itloop.server.db.tables import (
    ElectrodeArray,
    Image,
    RecordingSession,
    RecordingSite,
    SessionSite,
    Stimulus,
    StimulusKind,
    Subject,
)
from itloop.server.errors import ItloopError
from itloop.server.exports.tables import TableFormat, encode, media_type, responses_table
from itloop.server.exports.tables import sensitivity_table as build_sensitivity_table
from itloop.server.results import SensitivityFilter
from itloop.server.ui.rendering import ViewerDep, not_found, render

router = APIRouter()
EXAMPLES_PER_EPS = 3


def _as_id(raw: str | None) -> int | None:
    return int(raw) if raw and raw.isdigit() and 0 < int(raw) < 2**63 else None


def _as_day(raw: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(raw) if raw else None
    except ValueError:
        return None


def _subject_sites(db: Session, subject_id: int) -> list[tuple[int, str]]:
    rows = db.execute(
        select(RecordingSite.id, RecordingSite.label, RecordingSite.electrode, ElectrodeArray.name)
        .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
        .where(ElectrodeArray.subject_id == subject_id)
        .order_by(ElectrodeArray.name, RecordingSite.electrode)
    ).all()
    return [(sid, label or f"{array}:{electrode}") for sid, label, electrode, array in rows]


def example_pairs(
    db: Session, subject_id: int, site_id: int, day: dt.date | None
) -> tuple[RecordingSession | None, list[dict[str, Any]], list[float]]:
    """The newest session (up to ``day``) with attacks on the site: clean image → ε → attack."""
    query = (
        select(RecordingSession)
        .join(SessionSite, SessionSite.session_id == RecordingSession.id)
        .join(Stimulus, Stimulus.session_id == RecordingSession.id)
        .where(
            RecordingSession.subject_id == subject_id,
            SessionSite.site_id == site_id,
            Stimulus.site_id == site_id,
            Stimulus.kind == StimulusKind.attack,
        )
        .order_by(RecordingSession.scheduled_for.desc())
        .limit(1)
    )
    if day is not None:
        query = query.where(
            RecordingSession.scheduled_for
            < dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
        )
    session = db.scalar(query)
    if session is None:
        return None, [], []
    parent = aliased(Stimulus)
    parent_image = aliased(Image)
    rows = db.execute(
        select(Stimulus, Image.sha256, parent.id, parent_image.sha256)
        .join(Image, Image.id == Stimulus.image_id)
        .join(parent, parent.id == Stimulus.parent_id)
        .join(parent_image, parent_image.id == parent.image_id)
        .where(
            Stimulus.session_id == session.id,
            Stimulus.site_id == site_id,
            Stimulus.kind == StimulusKind.attack,
        )
        .order_by(parent.id, Stimulus.eps_requested_l2)
    ).all()
    by_parent: dict[int, dict[str, Any]] = {}
    eps_seen: set[float] = set()
    for stim, sha, parent_id, parent_sha in rows:
        if parent_id not in by_parent:
            if len(by_parent) >= EXAMPLES_PER_EPS:
                continue
            by_parent[parent_id] = {"clean_sha256": parent_sha, "by_eps": {}}
        eps = float(stim.eps_requested_l2 or 0.0)
        eps_seen.add(eps)
        by_parent[parent_id]["by_eps"][eps] = {
            "sha256": sha,
            "eps_realised_l2": stim.eps_realised_l2,
            "sign": stim.sign,
            "predicted_change": (
                stim.predicted_perturbed - stim.predicted_clean
                if stim.predicted_perturbed is not None and stim.predicted_clean is not None
                else None
            ),
        }
    return session, list(by_parent.values()), sorted(eps_seen)


@router.get("/sensitivity", response_class=HTMLResponse)
def dashboard(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    subjects = list(db.scalars(select(Subject).order_by(Subject.name)))
    q = request.query_params
    subject = next(
        (s for s in subjects if str(s.id) == q.get("subject_id")), subjects[0] if subjects else None
    )
    context: dict[str, Any] = {"subjects": subjects, "subject": subject, "specs": figures.FIGURES}
    if subject is None:
        return render(request, "dashboard.html", viewer, **context)
    days = figures.result_days(db, subject.id)
    day = _as_day(q.get("day"))
    if day not in days:
        day = None
    sites = _subject_sites(db, subject.id)
    site_id = _as_id(q.get("site_id"))
    if site_id not in {s for s, _l in sites}:
        site_id = sites[0][0] if sites else None
    params = {"subject_id": subject.id}
    if day is not None:
        params["day"] = day  # type: ignore[assignment]
    base = "&".join(f"{k}={v}" for k, v in params.items())
    session, pairs, pair_eps = (
        example_pairs(db, subject.id, site_id, day) if site_id else (None, [], [])
    )
    context.update(
        days=days,
        day=day,
        sites=sites,
        site_id=site_id,
        figure_query={
            name: base + (f"&site_id={site_id}" if spec.needs_site and site_id else "")
            for name, spec in figures.FIGURES.items()
        },
        pairs=pairs,
        pair_eps=pair_eps,
        pair_session=session,
        site_label=dict(sites).get(site_id or 0, ""),
    )
    return render(request, "dashboard.html", viewer, **context)


@router.get("/figures/{name}.{fmt}")
def figure(request: Request, name: str, fmt: str, viewer: ViewerDep, db: DbSession) -> Response:
    if name not in figures.FIGURES or fmt not in ("png", "svg", "csv"):
        return not_found(request, viewer, f"figure {name}.{fmt}")
    q = request.query_params
    subject_id = _as_id(q.get("subject_id"))
    if subject_id is None:
        return not_found(request, viewer, "subject (give subject_id)")
    params: dict[str, Any] = {"subject_id": subject_id, "day": _as_day(q.get("day"))}
    if figures.FIGURES[name].needs_site:
        params["site_id"] = _as_id(q.get("site_id"))
        params["session_id"] = _as_id(q.get("session_id"))
    try:
        table = figures.build_table(db, name, **params)
    except ItloopError as exc:
        return render(
            request, "not_found.html", viewer, status_code=exc.status_code, what=exc.message
        )
    body = figures.render(table, cast(figures.Format, fmt))
    types = {"png": "image/png", "svg": "image/svg+xml", "csv": "text/csv; charset=utf-8"}
    headers = {"Cache-Control": "no-store"}
    if fmt != "png":
        headers["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
    return Response(body, media_type=types[fmt], headers=headers)


@router.get("/artifacts/{sha256}")
def artifact_image(request: Request, sha256: str, viewer: ViewerDep, db: DbSession) -> Response:
    """A stimulus image from the content store (only images; never checkpoints)."""
    media = db.scalar(select(Image.media_type).where(Image.sha256 == sha256))
    store: ContentStore = request.app.state.store
    if media is None or sha256 not in store:
        return not_found(request, viewer, f"image {sha256[:12]}…")
    return FileResponse(
        store.existing(sha256),
        media_type=media,
        headers={"Cache-Control": "private, max-age=86400, immutable"},
    )


@router.get("/exports/{name}.{fmt}")
def export_table(
    request: Request, name: str, fmt: str, viewer: ViewerDep, db: DbSession
) -> Response:
    """Responses (by session) or sensitivity results (by subject) as CSV or Parquet."""
    if name not in ("responses", "sensitivity") or fmt not in ("csv", "parquet"):
        return not_found(request, viewer, f"export {name}.{fmt}")
    q = request.query_params
    if name == "responses":
        session_id = _as_id(q.get("session_id"))
        if session_id is None or db.get(RecordingSession, session_id) is None:
            return not_found(request, viewer, "session (give session_id)")
        table = responses_table(db, [session_id])
        filename = f"responses-session-{session_id}.{fmt}"
    else:
        subject_id = _as_id(q.get("subject_id"))
        table = build_sensitivity_table(db, SensitivityFilter(subject_id=subject_id))
        filename = f"sensitivity{f'-subject-{subject_id}' if subject_id else ''}.{fmt}"
    body = encode(table, cast(TableFormat, fmt))
    return Response(
        body,
        media_type=media_type(cast(TableFormat, fmt)),
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
