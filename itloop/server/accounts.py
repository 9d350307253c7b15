"""Users and API tokens: creation, lookup and revocation (used by the API and the CLI)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from itloop.server import audit
from itloop.server.auth import Principal
from itloop.server.db.tables import ApiToken, Rig, Role, TokenKind, User, utcnow
from itloop.server.errors import Conflict, InvalidInput, NotFound
from itloop.server.security import hash_password, new_token

MIN_PASSWORD_CHARS = 10


def create_user(
    db: Session,
    *,
    email: str,
    password: str,
    role: Role,
    display_name: str = "",
    actor: Principal | None = None,
) -> User:
    email = email.strip().lower()
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidInput(
            f"password has {len(password)} characters; use at least {MIN_PASSWORD_CHARS}",
            field="password",
        )
    if db.scalar(select(User.id).where(func.lower(User.email) == email)) is not None:
        raise Conflict(f"a user with email {email!r} exists", field="email", value=email)
    user = User(
        email=email, password_hash=hash_password(password), role=role, display_name=display_name
    )
    db.add(user)
    db.flush()
    audit.record(db, actor, "user.create", "user", user.id, role=role.value)
    db.commit()
    return user


def find_user(db: Session, email: str) -> User | None:
    return db.scalar(select(User).where(func.lower(User.email) == email.strip().lower()))


def create_token(
    db: Session,
    *,
    name: str,
    kind: TokenKind,
    user_id: int | None = None,
    rig_id: int | None = None,
    expires_in_days: int | None = None,
    actor: Principal | None = None,
) -> tuple[ApiToken, str]:
    """A new token row and the token string, which is never stored and shown only now."""
    if kind is TokenKind.rig:
        if rig_id is None:
            raise InvalidInput("a rig token needs rig_id", field="rig_id")
        if db.get(Rig, rig_id) is None:
            raise InvalidInput(f"rig_id {rig_id} does not exist", field="rig_id", value=rig_id)
        user_id = None
    elif rig_id is not None:
        raise InvalidInput(
            f"rig_id is only for rig tokens, not {kind.value}", field="rig_id", value=rig_id
        )
    if kind is TokenKind.user:
        if user_id is None:
            raise InvalidInput("a user token needs user_id", field="user_id")
        if db.get(User, user_id) is None:
            raise InvalidInput(f"user_id {user_id} does not exist", field="user_id", value=user_id)
    if kind is TokenKind.worker:
        user_id = None
    made = new_token()
    expires = utcnow() + dt.timedelta(days=expires_in_days) if expires_in_days else None
    token = ApiToken(
        name=name,
        lookup=made.lookup,
        secret_sha256=made.secret_sha256,
        kind=kind,
        user_id=user_id,
        rig_id=rig_id,
        created_by_id=actor.user_id if actor else None,
        expires_at=expires,
    )
    db.add(token)
    db.flush()
    audit.record(db, actor, "token.create", "api_token", token.id, kind=kind.value, name=name)
    db.commit()
    return token, made.token


def list_tokens(db: Session, *, include_revoked: bool = False) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(db.scalars(query))


def revoke_token(db: Session, token_id: int, *, actor: Principal | None = None) -> ApiToken:
    token = db.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"API token {token_id} does not exist", field="token_id", value=token_id)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(db, actor, "token.revoke", "api_token", token.id)
        db.commit()
    return token
