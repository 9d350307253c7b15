"""What the rig pulls: the published batch's manifest and its images (resumable downloads)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from sqlalchemy import select

from itloop.protocol.batches import BatchManifest
from itloop.server.api.params import PathId
from itloop.server.artifacts import ContentStore
from itloop.server.auth import CurrentPrincipal, DbSession, check_rig_access
from itloop.server.batches import build_manifest, published_batch
from itloop.server.db.tables import Image, Stimulus, utcnow
from itloop.server.errors import NotFound
from itloop.server.sessions import get_session

router = APIRouter(prefix="/sessions/{session_id}/batch", tags=["rig"])


def store_of(request: Request) -> ContentStore:
    store: ContentStore = request.app.state.store
    return store


@router.get("/manifest", response_model=BatchManifest)
def manifest(
    session_id: PathId, request: Request, db: DbSession, principal: CurrentPrincipal
) -> BatchManifest:
    """The manifest of the session's published batch (404 until it is published)."""
    session = get_session(db, session_id)
    check_rig_access(principal, session.rig_id, write=False)
    batch = published_batch(db, session)
    result = build_manifest(db, session, batch, store_of(request))
    if principal.rig_id is not None and batch.pulled_at is None:
        batch.pulled_at = utcnow()
        db.commit()
    return result


@router.get(
    "/images/{sha256}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, 206: {"description": "a byte range"}},
)
def image(
    session_id: PathId, sha256: str, request: Request, db: DbSession, principal: CurrentPrincipal
) -> FileResponse:
    """One stimulus image of the batch; honours ``Range: bytes=N-`` for resumed downloads."""
    session = get_session(db, session_id)
    check_rig_access(principal, session.rig_id, write=False)
    published_batch(db, session)
    in_batch = db.scalar(
        select(Image.media_type)
        .join(Stimulus, Stimulus.image_id == Image.id)
        .where(Stimulus.session_id == session_id, Image.sha256 == sha256)
        .limit(1)
    )
    if in_batch is None:
        raise NotFound(
            f"image {sha256} is not part of session {session_id}'s batch",
            field="sha256",
            value=sha256,
        )
    path = store_of(request).existing(sha256)
    return FileResponse(path, media_type=in_batch, headers={"ETag": f'"{sha256}"'})
