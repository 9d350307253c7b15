"""Analysts' exports: a session as NWB, responses and sensitivity results as CSV or Parquet."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response

from itloop.protocol.common import MAX_ID
from itloop.server.api.params import PathId, SensitivityQuery
from itloop.server.auth import DbSession, Reader
from itloop.server.exports.nwb import nwb_response
from itloop.server.exports.tables import encode, media_type, responses_table, sensitivity_table
from itloop.server.sessions import get_session

router = APIRouter(tags=["exports"])
Fmt = Literal["csv", "parquet"]
_TABLE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}},
}

_NWB_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"application/x-nwb": {}}}}


def _attachment(body: bytes, fmt: Fmt, filename: str) -> Response:
    return Response(
        body,
        media_type=media_type(fmt),
        headers={"Content-Disposition": f'attachment; filename="{filename}.{fmt}"'},
    )


@router.get(
    "/sessions/{session_id}/export.nwb",
    response_class=FileResponse,
    responses=_NWB_RESPONSES,
)
def session_nwb(session_id: PathId, db: DbSession, _who: Reader) -> FileResponse:
    """The session as one NWB file (409 until its batch is published)."""
    get_session(db, session_id)
    return nwb_response(db, session_id)


@router.get("/exports/responses.{fmt}", response_class=Response, responses=_TABLE_RESPONSES)
def responses_export(
    fmt: Fmt,
    session_id: Annotated[int, Query(ge=1, le=MAX_ID)],
    db: DbSession,
    _who: Reader,
) -> Response:
    """Spike counts of one session, one row per presentation × site (long format)."""
    get_session(db, session_id)
    return _attachment(
        encode(responses_table(db, [session_id]), fmt), fmt, f"responses-session-{session_id}"
    )


@router.get("/exports/sensitivity.{fmt}", response_class=Response, responses=_TABLE_RESPONSES)
def sensitivity_export(fmt: Fmt, db: DbSession, _who: Reader, where: SensitivityQuery) -> Response:
    """Sensitivity results with their analysis's provenance; filters combine with AND."""
    return _attachment(encode(sensitivity_table(db, where), fmt), fmt, "sensitivity")
