"""Templates and who is looking: the Jinja2 environment and the ``Viewer`` of each page."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from itloop.server.auth import (
    CSRF_FORM_FIELD,
    CSRF_HEADER,
    DbSession,
    Principal,
    get_settings,
    optional_principal,
    read_session_cookie,
)
from itloop.server.db.tables import SessionState, User
from itloop.server.errors import AuthenticationRequired

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

NOTICES = {
    "scheduled": "Session scheduled; its generation job is queued.",
    "cancelled": "Session cancelled.",
    "regenerated": "Session rescheduled; a new generation job is queued.",
    "site-activated": "Site activated.",
    "site-deactivated": "Site deactivated.",
    "token-revoked": "Token revoked.",
    "user-created": "User created.",
    "user-updated": "User updated.",
    "rig-created": "Rig created.",
    "logged-out": "You are logged out.",
}

STATE_TONE = {
    SessionState.scheduled: "neutral",
    SessionState.generating: "busy",
    SessionState.ready: "ready",
    SessionState.running: "busy",
    SessionState.uploaded: "ready",
    SessionState.analysed: "done",
    SessionState.failed: "bad",
    SessionState.cancelled: "muted",
}
LIVE_STATES = frozenset(
    {SessionState.scheduled, SessionState.generating, SessionState.ready, SessionState.running}
)


def _when(value: dt.datetime | dt.date | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if value is None:
        return "—"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime(fmt) + (" UTC" if "%H" in fmt else "")
    return value.strftime("%Y-%m-%d")


def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def duration(seconds: float | None) -> str:
    """``1 h 05 min`` / ``4 min 10 s`` / ``—``."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def make_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["num"] = _num
    env.filters["duration"] = duration
    env.filters["urlquote"] = lambda v: quote(str(v), safe="")
    env.globals["STATE_TONE"] = STATE_TONE
    env.globals["CSRF_FORM_FIELD"] = CSRF_FORM_FIELD
    env.globals["CSRF_HEADER"] = CSRF_HEADER
    return env


_ENV = make_environment()


@dataclass(frozen=True)
class Viewer:
    """The logged-in lab member looking at a page, and the CSRF token their forms must carry."""

    principal: Principal
    user: User
    csrf: str

    @property
    def can_write(self) -> bool:
        return self.principal.can_write

    @property
    def is_admin(self) -> bool:
        return self.principal.is_admin


def _is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def login_redirect(request: Request) -> HTTPException:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    location = f"/login?next={quote(target, safe='')}"
    headers = {"Location": location}
    if _is_htmx(request):
        headers["HX-Redirect"] = location
    return HTTPException(status_code=303, detail="login required", headers=headers)


async def optional_viewer(request: Request, db: DbSession) -> Viewer | None:
    """The cookie's user, or None; a Bearer header works too (without a CSRF token)."""
    try:
        principal = await optional_principal(request, db)
    except AuthenticationRequired:
        return None
    if principal is None or not principal.is_user or principal.user_id is None:
        return None
    user = db.get(User, principal.user_id)
    if user is None:
        return None
    csrf = ""
    cookie = request.cookies.get(get_settings(request).session_cookie_name)
    if cookie is not None:
        data = read_session_cookie(get_settings(request), cookie)
        csrf = str(data["csrf"]) if data else ""
    return Viewer(principal, user, csrf)


async def require_viewer(
    request: Request, viewer: Annotated[Viewer | None, Depends(optional_viewer)]
) -> Viewer:
    if viewer is None:
        raise login_redirect(request)
    return viewer


ViewerDep = Annotated[Viewer, Depends(require_viewer)]


def render(
    request: Request,
    template: str,
    viewer: Viewer | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    notice = NOTICES.get(request.query_params.get("notice", ""))
    html = _ENV.get_template(template).render(
        request=request,
        viewer=viewer,
        notice=notice,
        path=request.url.path,
        **context,
    )
    return HTMLResponse(
        html,
        status_code=status_code,
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def forbidden(request: Request, viewer: Viewer, action: str) -> HTMLResponse:
    """A 403 page naming what the viewer's role cannot do."""
    return render(
        request,
        "forbidden.html",
        viewer,
        status_code=403,
        action=action,
        role=viewer.user.role.value,
    )


def not_found(request: Request, viewer: Viewer, what: str) -> HTMLResponse:
    return render(request, "not_found.html", viewer, status_code=404, what=what)
