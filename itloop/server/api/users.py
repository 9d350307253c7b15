"""Lab members (admin only)."""

from collections.abc import Sequence

from fastapi import APIRouter
from sqlalchemy import select

from itloop.protocol.auth import UserCreate, UserOut
from itloop.server import accounts
from itloop.server.auth import Admin, DbSession
from itloop.server.db.tables import Role, User

router = APIRouter(prefix="/users", tags=["users"])


@router.get("", response_model=list[UserOut])
def list_users(db: DbSession, _admin: Admin) -> Sequence[User]:
    return db.scalars(select(User).order_by(User.id)).all()


@router.post("", response_model=UserOut, status_code=201)
def create_user(body: UserCreate, db: DbSession, admin: Admin) -> User:
    return accounts.create_user(
        db,
        email=body.email,
        password=body.password,
        role=Role(body.role.value),
        display_name=body.display_name,
        actor=admin,
    )
