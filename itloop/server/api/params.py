"""Parameter types shared by the routes: ids are bounded to what the database can hold."""

import datetime as dt
from typing import Annotated

from fastapi import Depends, Path, Query

from itloop.protocol.batches import StimulusKind as WireKind
from itloop.protocol.common import MAX_ID
from itloop.server.db.tables import StimulusKind
from itloop.server.results import SensitivityFilter

PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
QueryId = Annotated[int | None, Query(ge=1, le=MAX_ID)]


def _sensitivity_filter(
    subject_id: QueryId = None,
    session_id: QueryId = None,
    site_id: QueryId = None,
    eps_l2: float | None = None,
    kind: WireKind | None = None,
    day_from: dt.date | None = None,
    day_to: dt.date | None = None,
) -> SensitivityFilter:
    return SensitivityFilter(
        subject_id=subject_id,
        session_id=session_id,
        site_id=site_id,
        eps_l2=eps_l2,
        kind=None if kind is None else StimulusKind(kind.value),
        day_from=day_from,
        day_to=day_to,
    )


SensitivityQuery = Annotated[SensitivityFilter, Depends(_sensitivity_filter)]
"""The sensitivity filters as query parameters (the list and the export take the same)."""
