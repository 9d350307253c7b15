"""Sites and arrays (per-site history, activate/deactivate) and model versions (lineage, fit)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from itloop.server import audit
from itloop.server.auth import DbSession
from itloop.server.db.tables import (
    Analysis,
    ElectrodeArray,
    ModelVersion,
    ModelVersionSite,
    RecordingSession,
    RecordingSite,
    SensitivityResult,
    SessionSite,
    StimulusKind,
    Subject,
)
from itloop.server.exports.trials import load_session
from itloop.server.sitequality import (
    RESULT_KEY,
    SENSITIVITY_ANALYSIS_KIND,
    from_record,
    quality_record,
)
from itloop.server.ui.rendering import ViewerDep, forbidden, not_found, render

router = APIRouter()
HISTORY_SESSIONS = 60
"""Sessions shown (newest first) in a site's history."""


def _subject_choice(db: Session, request: Request) -> tuple[list[Subject], Subject | None]:
    subjects = list(db.scalars(select(Subject).order_by(Subject.name)))
    raw = request.query_params.get("subject_id", "")
    chosen = next((s for s in subjects if str(s.id) == raw), subjects[0] if subjects else None)
    return subjects, chosen


@router.get("/sites", response_class=HTMLResponse)
def sites_page(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    subjects, subject = _subject_choice(db, request)
    arrays: list[tuple[ElectrodeArray, list[RecordingSite]]] = []
    sessions_per_site: dict[int, int] = {}
    if subject is not None:
        for array in db.scalars(
            select(ElectrodeArray)
            .where(ElectrodeArray.subject_id == subject.id)
            .order_by(ElectrodeArray.name)
        ):
            sites = list(
                db.scalars(
                    select(RecordingSite)
                    .where(RecordingSite.array_id == array.id)
                    .order_by(RecordingSite.electrode)
                )
            )
            arrays.append((array, sites))
        sessions_per_site = dict(
            db.execute(
                select(SessionSite.site_id, func.count(SessionSite.session_id)).group_by(
                    SessionSite.site_id
                )
            ).all()
        )
    return render(
        request,
        "sites.html",
        viewer,
        subjects=subjects,
        subject=subject,
        arrays=arrays,
        sessions_per_site=sessions_per_site,
    )


def site_history(db: Session, site: RecordingSite) -> list[dict[str, Any]]:
    """Per session with this site, newest first: responsiveness, reliability, σ, bound at ε."""
    sessions = list(
        db.scalars(
            select(RecordingSession)
            .join(SessionSite, SessionSite.session_id == RecordingSession.id)
            .where(SessionSite.site_id == site.id)
            .order_by(RecordingSession.scheduled_for.desc())
            .limit(HISTORY_SESSIONS)
        )
    )
    bounds: dict[int, dict[float, float]] = defaultdict(dict)
    for result, session_id in db.execute(
        select(SensitivityResult, Analysis.session_id)
        .join(Analysis, Analysis.id == SensitivityResult.analysis_id)
        .where(
            SensitivityResult.site_id == site.id,
            SensitivityResult.kind == StimulusKind.attack,
        )
        .order_by(SensitivityResult.analysis_id)
    ).all():
        if session_id is not None:
            bounds[session_id][result.eps_l2] = result.lower_bound_normalised
    stored: dict[int, dict[str, Any]] = {}
    if sessions:
        for session_id, result in db.execute(
            select(Analysis.session_id, Analysis.result)
            .where(
                Analysis.session_id.in_([s.id for s in sessions]),
                Analysis.kind == SENSITIVITY_ANALYSIS_KIND,
            )
            .order_by(Analysis.id)
        ).all():
            record = (result or {}).get(RESULT_KEY)
            if session_id is not None and isinstance(record, dict):
                stored[session_id] = record  # the newest analysis wins
    label = site.label or str(site.id)
    rows = []
    for session in sessions:
        record = stored.get(session.id)
        if record is None:  # not analysed yet: compute this one site from the counts
            arrays = load_session(db, session.id)
            record = quality_record(arrays.only_sites([site.id]))
        rows.append(
            {
                "session": session,
                "quality": from_record(record, site.id, label),
                "usable": int(record.get("usable", 0)),
                "bounds": bounds.get(session.id, {}),
            }
        )
    return rows


@router.get("/sites/{site_id:int}", response_class=HTMLResponse)
def site_page(request: Request, site_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    site = db.get(RecordingSite, site_id) if 0 < site_id < 2**63 else None
    if site is None:
        return not_found(request, viewer, f"site {site_id}")
    array = db.get(ElectrodeArray, site.array_id)
    history = site_history(db, site)
    eps = sorted({e for row in history for e in row["bounds"]})
    heldout = db.execute(
        select(ModelVersionSite.model_version_id, ModelVersionSite.heldout_r)
        .where(ModelVersionSite.site_id == site.id)
        .order_by(ModelVersionSite.model_version_id)
    ).all()
    return render(
        request,
        "site.html",
        viewer,
        site=site,
        array=array,
        history=history,
        eps=eps,
        heldout=heldout,
    )


@router.post("/sites/{site_id:int}/active", response_class=HTMLResponse)
async def set_site_active(
    request: Request, site_id: int, viewer: ViewerDep, db: DbSession
) -> Response:
    if not viewer.can_write:
        return forbidden(request, viewer, "activate or deactivate sites")
    site = db.get(RecordingSite, site_id) if 0 < site_id < 2**63 else None
    if site is None:
        return not_found(request, viewer, f"site {site_id}")
    form = await request.form()
    active = str(form.get("active", "")) == "true"
    if site.active != active:
        site.active = active
        audit.record(db, viewer.principal, "site.update", "site", site.id, active=active)
        db.commit()
    array = db.get(ElectrodeArray, site.array_id)
    back = str(form.get("back", ""))
    target = (
        f"/sites/{site.id}"
        if back == "site"
        else f"/sites?subject_id={array.subject_id if array else ''}"
    )
    sep = "&" if "?" in target else "?"
    notice = "site-activated" if active else "site-deactivated"
    return RedirectResponse(f"{target}{sep}notice={notice}", status_code=303)


# --- models ---------------------------------------------------------------------------------


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    subjects, subject = _subject_choice(db, request)
    versions: list[ModelVersion] = []
    heldout: dict[int, float | None] = {}
    generated: dict[int, list[RecordingSession]] = defaultdict(list)
    if subject is not None:
        versions = list(
            db.scalars(
                select(ModelVersion)
                .where(ModelVersion.subject_id == subject.id)
                .order_by(ModelVersion.id.desc())
            )
        )
        ids = [v.id for v in versions]
        per_version: dict[int, list[float | None]] = defaultdict(list)
        for version_id, r in db.execute(
            select(ModelVersionSite.model_version_id, ModelVersionSite.heldout_r).where(
                ModelVersionSite.model_version_id.in_(ids)
            )
        ).all():
            per_version[version_id].append(r)
        heldout = {v: _mean(rs) for v, rs in per_version.items()}
        for session in db.scalars(
            select(RecordingSession)
            .where(RecordingSession.model_version_id.in_(ids))
            .order_by(RecordingSession.scheduled_for)
        ):
            if session.model_version_id is not None:
                generated[session.model_version_id].append(session)
    return render(
        request,
        "models.html",
        viewer,
        subjects=subjects,
        subject=subject,
        versions=versions,
        heldout=heldout,
        generated=generated,
    )


@router.get("/models/{version_id:int}", response_class=HTMLResponse)
def model_page(request: Request, version_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    version = db.get(ModelVersion, version_id) if 0 < version_id < 2**63 else None
    if version is None:
        return not_found(request, viewer, f"model version {version_id}")
    lineage = [version]
    seen = {version.id}
    while lineage[-1].parent_id is not None and lineage[-1].parent_id not in seen:
        parent = db.get(ModelVersion, lineage[-1].parent_id)
        if parent is None:
            break
        seen.add(parent.id)
        lineage.append(parent)
    children = list(db.scalars(select(ModelVersion).where(ModelVersion.parent_id == version.id)))
    sites = db.execute(
        select(ModelVersionSite, RecordingSite, ElectrodeArray.name)
        .join(RecordingSite, RecordingSite.id == ModelVersionSite.site_id)
        .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
        .where(ModelVersionSite.model_version_id == version.id)
        .order_by(ModelVersionSite.readout_index)
    ).all()
    sessions = list(
        db.scalars(
            select(RecordingSession)
            .where(RecordingSession.model_version_id == version.id)
            .order_by(RecordingSession.scheduled_for)
        )
    )
    return render(
        request,
        "model.html",
        viewer,
        version=version,
        lineage=lineage,
        children=children,
        sites=sites,
        sessions=sessions,
        mean_heldout=_mean([row[0].heldout_r for row in sites]),
    )
