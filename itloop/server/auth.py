"""Who is calling: Bearer tokens and UI session cookies, roles and scopes (FastAPI dependencies)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop.server.db.tables import ApiToken, Role, TokenKind, User, utcnow
from itloop.server.errors import AuthenticationRequired, PermissionDenied
from itloop.server.security import parse_token, secret_matches
from itloop.server.settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FORM_FIELD = "csrf_token"
_LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    kind: TokenKind
    user_id: int | None
    role: Role | None
    rig_id: int | None = None
    token_id: int | None = None
    via_cookie: bool = False

    @property
    def is_user(self) -> bool:
        return self.kind is TokenKind.user

    @property
    def can_write(self) -> bool:
        return self.is_user and self.role in (Role.admin, Role.staff)

    @property
    def is_admin(self) -> bool:
        return self.is_user and self.role is Role.admin


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as db:
        yield db


DbSession = Annotated[Session, Depends(get_db)]
AppSettings = Annotated[Settings, Depends(get_settings)]


# --- UI session cookie ------------------------------------------------------------------


def cookie_serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.secret_key.get_secret_value(), salt="itloop-session")


def make_session_cookie(settings: Settings, user_id: int) -> tuple[str, str]:
    """A signed cookie value for ``user_id`` and the CSRF token bound to it."""
    csrf = secrets.token_urlsafe(24)
    return cookie_serializer(settings).dumps({"uid": user_id, "csrf": csrf}), csrf


def read_session_cookie(settings: Settings, value: str) -> dict[str, Any] | None:
    try:
        data = cookie_serializer(settings).loads(value, max_age=settings.session_max_age_s)
    except BadSignature:
        return None
    return data if isinstance(data, dict) and "uid" in data and "csrf" in data else None


async def _csrf_ok(request: Request, expected: str) -> bool:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        field = form.get(CSRF_FORM_FIELD)
        sent = field if isinstance(field, str) else None
    return sent is not None and secrets.compare_digest(sent, expected)


# --- resolving the caller ---------------------------------------------------------------


def _principal_from_token(db: Session, raw: str) -> Principal:
    parsed = parse_token(raw)
    if parsed is None:
        raise AuthenticationRequired("malformed API token")
    lookup, secret = parsed
    token = db.scalar(select(ApiToken).where(ApiToken.lookup == lookup))
    if token is None or not secret_matches(secret, token.secret_sha256):
        raise AuthenticationRequired("unknown API token")
    now = utcnow()
    if token.revoked_at is not None:
        raise AuthenticationRequired(f"API token {token.name!r} was revoked")
    if token.expires_at is not None and _aware(token.expires_at) <= now:
        raise AuthenticationRequired(f"API token {token.name!r} expired")
    role: Role | None = None
    if token.kind is TokenKind.user:
        user = db.get(User, token.user_id)
        if user is None or not user.is_active:
            raise AuthenticationRequired("the owner of this API token is not active")
        role = user.role
    if token.last_used_at is None or now - _aware(token.last_used_at) > _LAST_USED_RESOLUTION:
        token.last_used_at = now
        db.commit()
    return Principal(
        kind=token.kind, user_id=token.user_id, role=role, rig_id=token.rig_id, token_id=token.id
    )


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


async def optional_principal(request: Request, db: DbSession) -> Principal | None:
    settings = get_settings(request)
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthenticationRequired("Authorization header must be 'Bearer <token>'")
        return await run_in_threadpool(_principal_from_token, db, credentials.strip())
    cookie = request.cookies.get(settings.session_cookie_name)
    if cookie is None:
        return None
    data = read_session_cookie(settings, cookie)
    if data is None:
        return None
    user = db.get(User, data["uid"])
    if user is None or not user.is_active:
        return None
    if request.method not in SAFE_METHODS and not await _csrf_ok(request, data["csrf"]):
        raise PermissionDenied("missing or wrong CSRF token", field=CSRF_HEADER)
    return Principal(kind=TokenKind.user, user_id=user.id, role=user.role, via_cookie=True)


async def current_principal(
    principal: Annotated[Principal | None, Depends(optional_principal)],
) -> Principal:
    if principal is None:
        raise AuthenticationRequired(
            "authentication required: send 'Authorization: Bearer <token>'"
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_reader(principal: CurrentPrincipal) -> Principal:
    """Any lab member (admin, staff, analyst); not rig or worker tokens."""
    if not principal.is_user:
        raise PermissionDenied(f"a {principal.kind.value} token cannot use this endpoint")
    return principal


def require_writer(principal: CurrentPrincipal) -> Principal:
    """Staff or admin: analysts are read-only."""
    require_reader(principal)
    if not principal.can_write:
        raise PermissionDenied(
            f"role {principal.role.value if principal.role else None!r} is read-only"
        )
    return principal


def require_admin(principal: CurrentPrincipal) -> Principal:
    require_reader(principal)
    if not principal.is_admin:
        raise PermissionDenied("admin role required")
    return principal


def require_job_access(principal: CurrentPrincipal) -> Principal:
    """Worker tokens and lab members; rig tokens are refused."""
    if principal.kind is TokenKind.rig:
        raise PermissionDenied("a rig token cannot use the jobs endpoints")
    return principal


def check_rig_access(principal: Principal, rig_id: int, *, write: bool) -> None:
    """Rig tokens reach only their own rig's sessions; lab members by role."""
    if principal.kind is TokenKind.rig:
        if principal.rig_id != rig_id:
            raise PermissionDenied(
                f"this rig token belongs to rig {principal.rig_id}, not rig {rig_id}"
            )
        return
    if principal.kind is TokenKind.worker:
        raise PermissionDenied("a worker token cannot use rig endpoints")
    if write and not principal.can_write:
        raise PermissionDenied(
            f"role {principal.role.value if principal.role else None!r} is read-only"
        )


Reader = Annotated[Principal, Depends(require_reader)]
Writer = Annotated[Principal, Depends(require_writer)]
Admin = Annotated[Principal, Depends(require_admin)]
JobCaller = Annotated[Principal, Depends(require_job_access)]
