"""Logging in and out of the web UI: the signed session cookie of ``itloop.server.auth``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from itloop.server import accounts
from itloop.server.auth import AppSettings, DbSession, make_session_cookie
from itloop.server.db.tables import utcnow
from itloop.server.security import DUMMY_PASSWORD_HASH, verify_password
from itloop.server.ui.rendering import Viewer, ViewerDep, optional_viewer, render

router = APIRouter()


def safe_next(target: str | None) -> str:
    """A local path to go to after login; anything else (other hosts, schemes) is ``/``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(
    request: Request,
    viewer: Annotated[Viewer | None, Depends(optional_viewer)],
    next: str | None = None,
) -> Response:
    if viewer is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", None, next=safe_next(next), email="", error=None)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    db: DbSession,
    settings: AppSettings,
    email: Annotated[str, Form(max_length=254)] = "",
    password: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    user = accounts.find_user(db, email) if email else None
    if user is None or not user.is_active:
        verify_password(DUMMY_PASSWORD_HASH, password)
        ok = False
    else:
        ok = verify_password(user.password_hash, password)
    if user is None or not ok:
        return render(
            request,
            "login.html",
            None,
            status_code=401,
            next=safe_next(next),
            email=email,
            error="Wrong email or password.",
        )
    user.last_login_at = utcnow()
    db.commit()
    cookie, _csrf = make_session_cookie(settings, user.id)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        settings.session_cookie_name,
        cookie,
        max_age=settings.session_max_age_s,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
    )
    return response


@router.post("/logout")
def logout(_viewer: ViewerDep, settings: AppSettings) -> Response:
    """Needs the CSRF token (checked when the viewer is resolved), so no page can log you out."""
    response = RedirectResponse("/login?notice=logged-out", status_code=303)
    response.delete_cookie(settings.session_cookie_name)
    return response
