"""Reading stored sensitivity results: the one set of filters the API and the exports share."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, func

from itloop.server.db.tables import Analysis, SensitivityResult, StimulusKind

__all__ = ["SensitivityFilter"]

Q = TypeVar("Q", bound=Select[*tuple[Any, ...]])


@dataclass(frozen=True)
class SensitivityFilter:
    """Which sensitivity results to read; every field given restricts, and they combine with AND."""

    subject_id: int | None = None
    session_id: int | None = None
    site_id: int | None = None
    eps_l2: float | None = None
    kind: StimulusKind | None = None
    day_from: dt.date | None = None
    day_to: dt.date | None = None

    def apply(self, query: Q) -> Q:
        """``query`` (joined to Analysis) restricted by this filter."""
        if self.subject_id is not None:
            query = query.where(Analysis.subject_id == self.subject_id)
        if self.session_id is not None:
            query = query.where(Analysis.session_id == self.session_id)
        if self.site_id is not None:
            query = query.where(SensitivityResult.site_id == self.site_id)
        if self.eps_l2 is not None:
            query = query.where(func.abs(SensitivityResult.eps_l2 - self.eps_l2) < 1e-9)
        if self.kind is not None:
            query = query.where(SensitivityResult.kind == self.kind)
        if self.day_from is not None:
            query = query.where(SensitivityResult.day >= self.day_from)
        if self.day_to is not None:
            query = query.where(SensitivityResult.day <= self.day_to)
        return query
