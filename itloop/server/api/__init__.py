"""The REST API under ``/api/v1``."""

from fastapi import APIRouter

from itloop.server.api import auth, health, lab, rig, tokens, users

router = APIRouter(prefix="/api/v1")
for module in (health, auth, users, tokens, lab, rig):
    router.include_router(module.router)

__all__ = ["router"]
