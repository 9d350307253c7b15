"""The audit log: who changed what, written in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from itloop.server.auth import Principal
from itloop.server.db.tables import AuditEntry


def record(
    db: Session,
    principal: Principal | None,
    action: str,
    target_type: str,
    target_id: object = None,
    **detail: Any,
) -> None:
    db.add(
        AuditEntry(
            actor_user_id=principal.user_id if principal else None,
            actor_token_id=principal.token_id if principal else None,
            action=action,
            target_type=target_type,
            target_id=None if target_id is None else str(target_id),
            detail=detail,
        )
    )
