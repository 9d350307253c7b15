"""The REST API under ``/api/v1``."""

from fastapi import APIRouter

from itloop.server.api import (
    auth,
    batches,
    health,
    lab,
    models,
    results,
    sessions,
    tokens,
    uploads,
    users,
)

router = APIRouter(prefix="/api/v1")
for module in (health, auth, users, tokens, lab, sessions, batches, uploads, models, results):
    router.include_router(module.router)

__all__ = ["router"]
