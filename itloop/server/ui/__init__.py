"""The web UI for lab staff and analysts: server-rendered pages (Jinja2 + htmx, vendored).

Pages need a logged-in lab member (the signed session cookie of ``itloop.server.auth``); unsafe
requests carry its CSRF token (hidden form field, or the header htmx adds). Analysts see every
page but the admin one and change nothing.
"""

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from itloop.server.ui import admin, dashboard, lab, login, schedule, sessions
from itloop.server.ui.rendering import STATIC

router = APIRouter(include_in_schema=False)

_STATIC_FILES = {
    "itloop.css": "text/css; charset=utf-8",
    "itloop.js": "text/javascript; charset=utf-8",
    "vendor/htmx.min.js": "text/javascript; charset=utf-8",
}


@router.get("/static/ui/{name:path}")
def static(name: str) -> Response:
    """The UI's own assets (a fixed list: nothing else on disk is reachable)."""
    media = _STATIC_FILES.get(name)
    if media is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(
        STATIC / name, media_type=media, headers={"Cache-Control": "public, max-age=3600"}
    )


# ``schedule`` before ``sessions``: /sessions/new is not a session id.
for module in (login, schedule, sessions, lab, dashboard, admin):
    router.include_router(module.router)

__all__ = ["router"]
