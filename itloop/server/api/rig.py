"""What a rig PC reaches: its own sessions' published batch (rig tokens are scoped to their rig)."""

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from itloop.server.auth import CurrentPrincipal, DbSession, check_rig_access
from itloop.server.db.tables import Batch, RecordingSession
from itloop.server.errors import NotFound

router = APIRouter(tags=["rig"])


@router.get("/sessions/{session_id}/batch")
def batch_status(session_id: int, db: DbSession, principal: CurrentPrincipal) -> dict[str, Any]:
    """The published batch of a session (404 until it is published)."""
    session = db.get(RecordingSession, session_id)
    if session is None:
        raise NotFound(f"session {session_id} does not exist", field="session_id", value=session_id)
    check_rig_access(principal, session.rig_id, write=False)
    batch = db.scalar(select(Batch).where(Batch.session_id == session_id))
    if batch is None or batch.published_at is None:
        raise NotFound(
            f"session {session_id} has no published batch yet", field="session_id", value=session_id
        )
    return {
        "session_id": session_id,
        "manifest_sha256": batch.manifest_sha256,
        "n_stimuli": batch.n_stimuli,
        "n_presentations": batch.n_presentations,
        "published_at": batch.published_at.isoformat(),
    }
