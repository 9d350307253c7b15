"""Wire models for users and API tokens."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from pydantic import EmailStr, Field

from itloop.protocol.common import Id, WireModel


class Role(StrEnum):
    admin = "admin"
    staff = "staff"
    analyst = "analyst"


class TokenKind(StrEnum):
    user = "user"  # acts with its owner's role (analyst tokens are read-only)
    rig = "rig"  # limited to its own rig's sessions: pull batch, upload
    worker = "worker"  # limited to jobs


class UserCreate(WireModel):
    email: EmailStr
    password: str = Field(min_length=10, max_length=200)
    role: Role
    display_name: str = Field(default="", max_length=120)


class UserOut(WireModel):
    id: int
    email: str
    role: Role
    display_name: str
    is_active: bool
    created_at: dt.datetime


class TokenCreate(WireModel):
    name: str = Field(min_length=1, max_length=120)
    kind: TokenKind = TokenKind.user
    rig_id: Id | None = None
    user_id: Id | None = Field(default=None, description="owner of a user token; default: caller")
    expires_in_days: int | None = Field(default=None, gt=0, le=3650)


class TokenOut(WireModel):
    id: int
    name: str
    kind: TokenKind
    user_id: int | None
    rig_id: int | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


class TokenCreated(TokenOut):
    """The only answer that ever carries the token itself: it is shown once."""

    token: str
