"""Wire models every endpoint shares: health and the error body."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

MAX_ID = 2**63 - 1
MAX_INT32 = 2**31 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID, description="database id")]


class WireModel(BaseModel):
    """Base of every wire model: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)


class Health(WireModel):
    status: str
    version: str
    database: str
    schema_revision: str | None


class ErrorDetail(WireModel):
    """The body of every error answer: what was wrong and, where known, which value."""

    error: str
    message: str
    field: str | None = None
    value: Any = None
    errors: list[dict[str, Any]] | None = None
