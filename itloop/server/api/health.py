"""Liveness and readiness of the server and its database."""

from fastapi import APIRouter
from sqlalchemy import text

from itloop import __version__
from itloop.protocol.common import Health
from itloop.server.auth import DbSession

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health(db: DbSession) -> Health:
    db.execute(text("SELECT 1"))
    try:
        revision = db.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:  # a database that was never migrated
        db.rollback()
        revision = None
    return Health(
        status="ok",
        version=__version__,
        database=db.get_bind().dialect.name,
        schema_revision=revision,
    )
