"""API tokens: created by admins (shown once), listed, revoked."""

from collections.abc import Sequence

from fastapi import APIRouter

from itloop.protocol.auth import TokenCreate, TokenCreated, TokenOut
from itloop.server import accounts
from itloop.server.api.params import PathId
from itloop.server.auth import Admin, DbSession
from itloop.server.db.tables import ApiToken, TokenKind

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.get("", response_model=list[TokenOut])
def list_tokens(db: DbSession, _admin: Admin, include_revoked: bool = False) -> Sequence[ApiToken]:
    return accounts.list_tokens(db, include_revoked=include_revoked)


@router.post("", response_model=TokenCreated, status_code=201)
def create_token(body: TokenCreate, db: DbSession, admin: Admin) -> TokenCreated:
    kind = TokenKind(body.kind.value)
    user_id = body.user_id if body.user_id is not None else admin.user_id
    row, secret = accounts.create_token(
        db,
        name=body.name,
        kind=kind,
        user_id=user_id if kind is TokenKind.user else None,
        rig_id=body.rig_id,
        expires_in_days=body.expires_in_days,
        actor=admin,
    )
    return TokenCreated.model_validate(
        {**TokenOut.model_validate(row).model_dump(), "token": secret}
    )


@router.delete("/{token_id}", response_model=TokenOut)
def revoke_token(token_id: PathId, db: DbSession, admin: Admin) -> ApiToken:
    return accounts.revoke_token(db, token_id, actor=admin)
