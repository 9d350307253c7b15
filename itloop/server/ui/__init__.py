"""The web UI for lab staff and analysts: server-rendered pages (Jinja2 + htmx, vendored)."""

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)

__all__ = ["router"]
