"""Analysts' reads: sensitivity results per site × ε × day, and paged responses."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query
from sqlalchemy import select

from itloop.protocol.sessions import Page, ResponseOut, SensitivityResultOut
from itloop.server.api.params import QueryId, SensitivityQuery
from itloop.server.auth import DbSession, Reader
from itloop.server.db.tables import (
    Analysis,
    Presentation,
    Response,
    SensitivityResult,
    SessionSite,
)
from itloop.server.uploads import unpack_counts

router = APIRouter(tags=["results"])


@router.get("/sensitivity", response_model=list[SensitivityResultOut])
def sensitivity(db: DbSession, _who: Reader, where: SensitivityQuery) -> list[SensitivityResult]:
    """Normalised lower bounds with their intervals; filters combine with AND."""
    query = (
        select(SensitivityResult)
        .join(Analysis)
        .order_by(SensitivityResult.day, SensitivityResult.site_id, SensitivityResult.eps_l2)
    )
    return list(db.scalars(where.apply(query)))


@router.get("/responses", response_model=Page[ResponseOut])
def responses(
    db: DbSession,
    _who: Reader,
    session_id: QueryId = None,
    site_id: QueryId = None,
    stimulus_id: QueryId = None,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Page[ResponseOut]:
    """Spike counts, one item per presentation × site, in a stable order."""
    base = select(Response.id, Response.n_sites).join(
        Presentation, Presentation.id == Response.presentation_id
    )
    if session_id is not None:
        base = base.where(Presentation.session_id == session_id)
    if stimulus_id is not None:
        base = base.where(Presentation.stimulus_id == stimulus_id)
    if site_id is not None:
        base = base.join(
            SessionSite,
            (SessionSite.session_id == Presentation.session_id) & (SessionSite.site_id == site_id),
        )
    index = db.execute(base.order_by(Response.id)).all()
    widths = np.array([1 if site_id is not None else n for _, n in index], dtype=np.int64)
    ends = np.cumsum(widths)
    total = int(ends[-1]) if ends.size else 0
    first = int(np.searchsorted(ends, offset, side="right"))
    items: list[ResponseOut] = []
    sites_of: dict[int, list[int]] = {}
    row = first
    while row < len(index) and len(items) < limit:
        response, presentation = db.execute(
            select(Response, Presentation)
            .join(Presentation, Presentation.id == Response.presentation_id)
            .where(Response.id == index[row][0])
        ).one()
        session_sites = sites_of.get(presentation.session_id)
        if session_sites is None:
            session_sites = sorted(
                db.scalars(
                    select(SessionSite.site_id).where(
                        SessionSite.session_id == presentation.session_id
                    )
                )
            )
            sites_of[presentation.session_id] = session_sites
        counts = unpack_counts(response.counts, response.n_sites)
        pairs = list(zip(session_sites, counts.tolist(), strict=True))
        if site_id is not None:
            pairs = [pair for pair in pairs if pair[0] == site_id]
        skip = offset - int(ends[row - 1]) if row == first and row > 0 else 0
        if row == first and row == 0:
            skip = offset
        for site, count in pairs[max(skip, 0) :]:
            if len(items) >= limit:
                break
            items.append(
                ResponseOut(
                    presentation_id=presentation.id,
                    session_id=presentation.session_id,
                    stimulus_id=presentation.stimulus_id,
                    site_id=site,
                    spike_count=int(count),
                    window_start_ms=response.window_start_ms,
                    window_end_ms=response.window_end_ms,
                    complete=response.complete,
                    valid=presentation.valid,
                    fixation_ok=presentation.fixation_ok,
                )
            )
        row += 1
    return Page[ResponseOut](items=items, total=total, offset=offset, limit=limit)
