"""The rig's upload of presentations and spike counts (idempotent, chunked, all-or-nothing)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from itloop.protocol.batches import IDEMPOTENCY_KEY_PATTERN, UploadChunk, UploadReceipt
from itloop.server import uploads
from itloop.server.api.params import PathId
from itloop.server.auth import CurrentPrincipal, DbSession, Principal, check_rig_access
from itloop.server.errors import BadIdempotencyKey, InvalidInput, UnsupportedMediaType
from itloop.server.sessions import get_session

router = APIRouter(prefix="/sessions/{session_id}", tags=["rig"])
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


@router.post(
    "/uploads",
    response_model=UploadReceipt,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": UploadChunk.model_json_schema()}},
        }
    },
    responses={
        200: {"model": UploadReceipt, "description": "a replay of a stored upload"},
        409: {"description": "the same key is in flight, or the session does not take uploads"},
        413: {"description": "body too large"},
        415: {"description": "not application/json"},
    },
)
async def upload(
    session_id: PathId,
    request: Request,
    db: DbSession,
    principal: CurrentPrincipal,
    idempotency_key: Annotated[str, Header(alias="Idempotency-Key")],
) -> JSONResponse:
    """Store a chunk of presentations with their counts, exactly once per Idempotency-Key."""
    if not _KEY.match(idempotency_key):
        raise BadIdempotencyKey(
            f"Idempotency-Key {idempotency_key[:60]!r} must match {IDEMPOTENCY_KEY_PATTERN}",
            field="Idempotency-Key",
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type {content_type or None!r} is not application/json", field="Content-Type"
        )
    raw = await request.body()
    outcome = await run_in_threadpool(_ingest, db, principal, session_id, raw, idempotency_key)
    return JSONResponse(
        outcome.receipt.model_dump(mode="json"),
        status_code=200 if outcome.replayed else 201,
        headers={"Idempotent-Replayed": "true" if outcome.replayed else "false"},
    )


def _ingest(
    db: Session, principal: Principal, session_id: int, raw: bytes, key: str
) -> uploads.UploadOutcome:
    session = get_session(db, session_id)
    check_rig_access(principal, session.rig_id, write=True)
    try:
        chunk = UploadChunk.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(
            f"{where}: {first['msg']}", field=where, value=_jsonable(first.get("input"))
        ) from exc
    return uploads.ingest(
        db, session, chunk, key=key, request_sha256=uploads.body_sha256(raw), actor=principal
    )


def _jsonable(value: object) -> object:
    return (
        value if isinstance(value, str | int | float | bool) or value is None else repr(value)[:200]
    )
