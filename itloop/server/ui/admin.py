"""Admin pages: users and roles, API tokens (shown once, at creation), rigs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from itloop.protocol.lab import RigCreate
from itloop.server import accounts, audit
from itloop.server.auth import DbSession
from itloop.server.db.tables import ApiToken, Rig, Role, TokenKind, User
from itloop.server.errors import ItloopError
from itloop.server.ui.rendering import Viewer, ViewerDep, forbidden, render

router = APIRouter(prefix="/admin")


def _context(db: Session) -> dict[str, Any]:
    return {
        "users": list(db.scalars(select(User).order_by(User.id))),
        "tokens": list(db.scalars(select(ApiToken).order_by(ApiToken.id.desc()))),
        "rigs": list(db.scalars(select(Rig).order_by(Rig.name))),
        "roles": [r.value for r in Role],
        "kinds": [k.value for k in TokenKind],
    }


def _page(
    request: Request,
    viewer: Viewer,
    db: Session,
    *,
    status_code: int = 200,
    **extra: Any,
) -> HTMLResponse:
    context = _context(db)
    context.setdefault("errors", {})
    context.update(extra)
    return render(request, "admin.html", viewer, status_code=status_code, **context)


@router.get("", response_class=HTMLResponse)
def admin_page(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.is_admin:
        return forbidden(request, viewer, "administer users, tokens and rigs")
    return _page(request, viewer, db)


def _as_id(raw: object) -> int | None:
    text = str(raw or "").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 2**63 else None


@router.post("/users", response_class=HTMLResponse)
async def create_user(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.is_admin:
        return forbidden(request, viewer, "create users")
    form = await request.form()
    email = str(form.get("email", "")).strip()
    role = str(form.get("role", ""))
    errors: dict[str, str] = {}
    if "@" not in email:
        errors["user_email"] = f"{email or '(empty)'} is not an email address"
    if role not in Role.__members__:
        errors["user_role"] = "choose a role"
    if not errors:
        try:
            accounts.create_user(
                db,
                email=email,
                password=str(form.get("password", "")),
                role=Role(role),
                display_name=str(form.get("display_name", "")).strip()[:120],
                actor=viewer.principal,
            )
            return RedirectResponse("/admin?notice=user-created", status_code=303)
        except ItloopError as exc:
            db.rollback()
            errors[f"user_{exc.field or 'email'}"] = exc.message
    return _page(request, viewer, db, status_code=422, errors=errors, user_form=dict(form))


@router.post("/users/{user_id:int}", response_class=HTMLResponse)
async def update_user(request: Request, user_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.is_admin:
        return forbidden(request, viewer, "change users")
    user = db.get(User, user_id) if 0 < user_id < 2**63 else None
    form = await request.form()
    role = str(form.get("role", ""))
    active = str(form.get("is_active", "")) == "true"
    if user is None or role not in Role.__members__:
        return _page(request, viewer, db, status_code=422, errors={"users": "no such user or role"})
    if user.id == viewer.user.id and (Role(role) is not Role.admin or not active):
        return _page(
            request,
            viewer,
            db,
            status_code=422,
            errors={"users": "you cannot demote or deactivate yourself"},
        )
    changes: dict[str, object] = {}
    if user.role is not Role(role):
        changes["role"] = role
        user.role = Role(role)
    if user.is_active != active:
        changes["is_active"] = active
        user.is_active = active
    if changes:
        audit.record(db, viewer.principal, "user.update", "user", user.id, **changes)
        db.commit()
    return RedirectResponse("/admin?notice=user-updated", status_code=303)


@router.post("/tokens", response_class=HTMLResponse)
async def create_token(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.is_admin:
        return forbidden(request, viewer, "create API tokens")
    form = await request.form()
    name = str(form.get("name", "")).strip()
    kind = str(form.get("kind", "user"))
    errors: dict[str, str] = {}
    if not name or len(name) > 120:
        errors["token_name"] = "give the token a name (1–120 characters)"
    if kind not in TokenKind.__members__:
        errors["token_kind"] = "choose a kind"
    expires_raw = str(form.get("expires_in_days", "")).strip()
    expires = None
    if expires_raw:
        if not expires_raw.isdigit() or not 0 < int(expires_raw) <= 3650:
            errors["token_expires_in_days"] = f"{expires_raw!r} is not 1–3650 days"
        else:
            expires = int(expires_raw)
    if not errors:
        token_kind = TokenKind(kind)
        try:
            row, secret = accounts.create_token(
                db,
                name=name,
                kind=token_kind,
                user_id=(_as_id(form.get("user_id")) or viewer.user.id)
                if token_kind is TokenKind.user
                else None,
                rig_id=_as_id(form.get("rig_id")) if token_kind is TokenKind.rig else None,
                expires_in_days=expires,
                actor=viewer.principal,
            )
        except ItloopError as exc:
            db.rollback()
            errors[f"token_{exc.field or 'name'}"] = exc.message
        else:
            return _page(request, viewer, db, status_code=201, created=row, secret=secret)
    return _page(request, viewer, db, status_code=422, errors=errors, token_form=dict(form))


@router.post("/tokens/{token_id:int}/revoke", response_class=HTMLResponse)
def revoke_token(request: Request, token_id: int, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.is_admin:
        return forbidden(request, viewer, "revoke API tokens")
    try:
        accounts.revoke_token(db, token_id, actor=viewer.principal)
    except ItloopError as exc:
        return _page(
            request, viewer, db, status_code=exc.status_code, errors={"tokens": exc.message}
        )
    return RedirectResponse("/admin?notice=token-revoked#tokens", status_code=303)


@router.post("/rigs", response_class=HTMLResponse)
async def create_rig(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.is_admin:
        return forbidden(request, viewer, "create rigs")
    form = await request.form()
    values = {
        k: str(form.get(k, "")).strip()
        for k in ("name", "description", "refresh_rate_hz", "viewing_distance_cm")
    }
    errors: dict[str, str] = {}
    try:
        body = RigCreate.model_validate({k: v for k, v in values.items() if v != ""})
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "name"
            errors.setdefault(f"rig_{field}", str(error["msg"]))
    else:
        rig = Rig(**body.model_dump())
        db.add(rig)
        try:
            db.flush()
        except IntegrityError:
            db.rollback()
            errors["rig_name"] = f"a rig named {body.name!r} exists"
        else:
            audit.record(db, viewer.principal, "rig.create", "rig", rig.id)
            db.commit()
            return RedirectResponse("/admin?notice=rig-created#rigs", status_code=303)
    return _page(request, viewer, db, status_code=422, errors=errors, rig_form=values)
