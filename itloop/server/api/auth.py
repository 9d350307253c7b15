"""UI login and logout: a signed session cookie plus a CSRF token for unsafe requests."""

from typing import Annotated

from fastapi import APIRouter, Form, Response

from itloop.protocol.auth import UserOut
from itloop.protocol.common import WireModel
from itloop.server import accounts
from itloop.server.auth import AppSettings, CurrentPrincipal, DbSession, make_session_cookie
from itloop.server.db.tables import User, utcnow
from itloop.server.errors import AuthenticationRequired, NotFound
from itloop.server.security import DUMMY_PASSWORD_HASH, verify_password

router = APIRouter(prefix="/auth", tags=["auth"])


class LoginResult(WireModel):
    user: UserOut
    csrf_token: str


@router.post("/login", response_model=LoginResult)
def login(
    response: Response,
    db: DbSession,
    settings: AppSettings,
    email: Annotated[str, Form()],
    password: Annotated[str, Form()],
) -> LoginResult:
    user = accounts.find_user(db, email)
    if user is None or not user.is_active:
        verify_password(DUMMY_PASSWORD_HASH, password)
        raise AuthenticationRequired("wrong email or password")
    if not verify_password(user.password_hash, password):
        raise AuthenticationRequired("wrong email or password")
    user.last_login_at = utcnow()
    db.commit()
    cookie, csrf = make_session_cookie(settings, user.id)
    response.set_cookie(
        settings.session_cookie_name,
        cookie,
        max_age=settings.session_max_age_s,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
    )
    return LoginResult(user=UserOut.model_validate(user), csrf_token=csrf)


@router.post("/logout", status_code=204)
def logout(response: Response, settings: AppSettings, _principal: CurrentPrincipal) -> None:
    response.delete_cookie(settings.session_cookie_name)


@router.get("/me", response_model=UserOut)
def me(principal: CurrentPrincipal, db: DbSession) -> User:
    user = db.get(User, principal.user_id) if principal.user_id is not None else None
    if user is None:
        raise NotFound(f"a {principal.kind.value} token has no user")
    return user
