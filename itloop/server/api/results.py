"""Analysts' reads: sensitivity results per site × ε × day, and paged responses."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from itloop.protocol.batches import StimulusKind as WireKind
from itloop.protocol.sessions import Page, ResponseOut, SensitivityResultOut
from itloop.server.api.params import QueryId
from itloop.server.auth import DbSession, Reader
from itloop.server.db.tables import (
    Analysis,
    Presentation,
    Response,
    SensitivityResult,
    StimulusKind,
)

router = APIRouter(tags=["results"])


@router.get("/sensitivity", response_model=list[SensitivityResultOut])
def sensitivity(
    db: DbSession,
    _who: Reader,
    subject_id: QueryId = None,
    site_id: QueryId = None,
    session_id: QueryId = None,
    eps_l2: float | None = None,
    kind: WireKind | None = None,
    day_from: dt.date | None = None,
    day_to: dt.date | None = None,
) -> list[SensitivityResult]:
    """Normalised lower bounds with their intervals; filters combine with AND."""
    query = (
        select(SensitivityResult)
        .join(Analysis)
        .order_by(SensitivityResult.day, SensitivityResult.site_id, SensitivityResult.eps_l2)
    )
    if subject_id is not None:
        query = query.where(Analysis.subject_id == subject_id)
    if session_id is not None:
        query = query.where(Analysis.session_id == session_id)
    if site_id is not None:
        query = query.where(SensitivityResult.site_id == site_id)
    if eps_l2 is not None:
        query = query.where(func.abs(SensitivityResult.eps_l2 - eps_l2) < 1e-9)
    if kind is not None:
        query = query.where(SensitivityResult.kind == StimulusKind(kind.value))
    if day_from is not None:
        query = query.where(SensitivityResult.day >= day_from)
    if day_to is not None:
        query = query.where(SensitivityResult.day <= day_to)
    return list(db.scalars(query))


@router.get("/responses", response_model=Page[ResponseOut])
def responses(
    db: DbSession,
    _who: Reader,
    session_id: QueryId = None,
    site_id: QueryId = None,
    stimulus_id: QueryId = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Page[ResponseOut]:
    """Spike counts, one row per presentation × site, in a stable order."""
    base = select(Response, Presentation).join(
        Presentation, Presentation.id == Response.presentation_id
    )
    if session_id is not None:
        base = base.where(Presentation.session_id == session_id)
    if site_id is not None:
        base = base.where(Response.site_id == site_id)
    if stimulus_id is not None:
        base = base.where(Presentation.stimulus_id == stimulus_id)
    total = db.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = db.execute(base.order_by(Response.id).offset(offset).limit(limit)).all()
    items = [
        ResponseOut(
            presentation_id=p.id,
            session_id=p.session_id,
            stimulus_id=p.stimulus_id,
            site_id=r.site_id,
            spike_count=r.spike_count,
            window_start_ms=r.window_start_ms,
            window_end_ms=r.window_end_ms,
            complete=r.complete,
            valid=p.valid,
            fixation_ok=p.fixation_ok,
        )
        for r, p in rows
    ]
    return Page[ResponseOut](items=items, total=total, offset=offset, limit=limit)
