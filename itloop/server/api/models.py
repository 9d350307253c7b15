"""Model versions of IT: list, detail, lineage (they are immutable)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter
from sqlalchemy import select

from itloop.protocol.sessions import ModelVersionOut
from itloop.server.api.params import PathId, QueryId
from itloop.server.auth import DbSession, Reader
from itloop.server.db.tables import ModelVersion
from itloop.server.errors import NotFound

router = APIRouter(prefix="/model-versions", tags=["models"])


def _get(db: DbSession, version_id: int) -> ModelVersion:
    version = db.get(ModelVersion, version_id)
    if version is None:
        raise NotFound(
            f"model version {version_id} does not exist", field="version_id", value=version_id
        )
    return version


@router.get("", response_model=list[ModelVersionOut])
def list_versions(
    db: DbSession, _who: Reader, subject_id: QueryId = None
) -> Sequence[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.id)
    if subject_id is not None:
        query = query.where(ModelVersion.subject_id == subject_id)
    return db.scalars(query).all()


@router.get("/{version_id}", response_model=ModelVersionOut)
def get_version(version_id: PathId, db: DbSession, _who: Reader) -> ModelVersion:
    return _get(db, version_id)


@router.get("/{version_id}/lineage", response_model=list[ModelVersionOut])
def lineage(version_id: PathId, db: DbSession, _who: Reader) -> list[ModelVersion]:
    """This version and its ancestors, newest first (back to the day-0 model)."""
    chain = [_get(db, version_id)]
    seen = {version_id}
    while chain[-1].parent_id is not None and chain[-1].parent_id not in seen:
        seen.add(chain[-1].parent_id)
        chain.append(_get(db, chain[-1].parent_id))
    return chain
