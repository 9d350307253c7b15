"""Reading stored sensitivity results: the one set of filters the API and the exports share."""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeVar

from sqlalchemy import Select, func

from itloop.server.db.tables import Analysis, SensitivityResult, StimulusKind

__all__ = ["filter_sensitivity"]

Q = TypeVar("Q", bound=Select[*tuple[Any, ...]])


def filter_sensitivity(
    query: Q,
    *,
    subject_id: int | None = None,
    session_id: int | None = None,
    site_id: int | None = None,
    eps_l2: float | None = None,
    kind: StimulusKind | None = None,
    day_from: dt.date | None = None,
    day_to: dt.date | None = None,
) -> Q:
    """``query`` (joined to Analysis) restricted by every filter given; they combine with AND."""
    if subject_id is not None:
        query = query.where(Analysis.subject_id == subject_id)
    if session_id is not None:
        query = query.where(Analysis.session_id == session_id)
    if site_id is not None:
        query = query.where(SensitivityResult.site_id == site_id)
    if eps_l2 is not None:
        query = query.where(func.abs(SensitivityResult.eps_l2 - eps_l2) < 1e-9)
    if kind is not None:
        query = query.where(SensitivityResult.kind == kind)
    if day_from is not None:
        query = query.where(SensitivityResult.day >= day_from)
    if day_to is not None:
        query = query.where(SensitivityResult.day <= day_to)
    return query
