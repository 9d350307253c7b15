"""The REST API under ``/api/v1``."""

from typing import Any

from fastapi import APIRouter

from itloop.protocol.common import ErrorDetail
from itloop.server.api import (
    auth,
    batches,
    exports,
    health,
    jobs,
    lab,
    models,
    results,
    sessions,
    tokens,
    uploads,
    users,
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail, "description": text}
    for code, text in {
        400: "bad request (e.g. credentials in the URL, a malformed header)",
        401: "no or unusable credentials",
        403: "not allowed for this caller",
        404: "no such resource",
        409: "conflict with the resource's state",
        413: "request body too large",
        415: "unsupported media type",
        422: "invalid input; the message names the offending value",
    }.items()
}

router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)
for module in (
    health,
    auth,
    users,
    tokens,
    lab,
    sessions,
    batches,
    uploads,
    models,
    results,
    jobs,
    exports,
):
    router.include_router(module.router)

__all__ = ["router"]
