"""The ASGI application: ``create_app(settings)`` builds everything from the given settings."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine, select
from starlette.types import ASGIApp, Receive, Scope, Send

from itloop import __version__
from itloop.protocol.jobs import JobKind
from itloop.server.api import router as api_router
from itloop.server.artifacts import ContentStore
from itloop.server.db.engine import make_engine, make_sessionmaker
from itloop.server.db.tables import Job, JobState
from itloop.server.errors import CredentialsInUrl, ItloopError
from itloop.server.jobs import JobService
from itloop.server.security import TokenRedactingFilter, parse_token
from itloop.server.settings import Settings
from itloop.server.ui import router as ui_router

CREDENTIAL_QUERY_PARAMS = frozenset(
    {"access_token", "token", "api_key", "apikey", "api_token", "auth", "authorization", "bearer"}
)


def _error_body(exc: ItloopError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if exc.field is not None:
        body["field"] = exc.field
    if exc.value is not None:
        body["value"] = exc.value
    return body


class RefuseCredentialsInUrl:
    """Refuses any request whose query string carries something that looks like a credential."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            query = scope["query_string"].decode("latin-1")
            for name, value in parse_qsl(query, keep_blank_values=True):
                if name.lower() in CREDENTIAL_QUERY_PARAMS or parse_token(value) is not None:
                    exc = CredentialsInUrl(
                        f"credentials are refused in the URL (query parameter {name!r}); "
                        "send 'Authorization: Bearer <token>' instead",
                        field=name,
                    )
                    response = JSONResponse(_error_body(exc), status_code=exc.status_code)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class LimitBodySize:
    """Answers 413 to a request body larger than ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {
            "error": "body_too_large",
            "message": f"request body exceeds {self.max_bytes} bytes",
        }
        await JSONResponse(body, status_code=413)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _install_log_redaction() -> None:
    for name in ("", "uvicorn", "uvicorn.access", "uvicorn.error", "itloop"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactingFilter) for f in logger.filters):
            logger.addFilter(TokenRedactingFilter())


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    """The itloop server for ``settings``; ``engine`` overrides the one the settings name."""
    owns_engine = engine is None
    engine = engine if engine is not None else make_engine(settings.effective_database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.close()
        if owns_engine:
            engine.dispose()

    app = FastAPI(
        title="itloop",
        version=__version__,
        summary="Closed-loop measurement of the adversarial sensitivity of IT neural sites",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.store = ContentStore(settings.artifact_dir)
    jobs = JobService(settings, app.state.sessionmaker)
    app.state.jobs = jobs

    def enqueue_generation(session_id: int) -> None:
        """Enqueue the session's generation unless one is queued or running already."""
        with app.state.sessionmaker() as db:
            previous = list(
                db.scalars(
                    select(Job.state).where(
                        Job.session_id == session_id, Job.kind == JobKind.generate.value
                    )
                )
            )
        if any(state in (JobState.queued, JobState.running) for state in previous):
            return
        jobs.enqueue(
            JobKind.generate,
            {"session_id": session_id},
            key=f"session-{session_id}-{len(previous) + 1}",
            session_id=session_id,
        )

    app.state.enqueue_generation = enqueue_generation
    _install_log_redaction()

    @app.exception_handler(ItloopError)
    async def _domain_error(_request: Request, exc: ItloopError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(_error_body(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        location = ".".join(str(p) for p in first.get("loc", ()))
        value = first.get("input")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        body = {
            "error": "invalid_input",
            "message": f"{location}: {first.get('msg', 'invalid value')}",
            "field": location,
            "value": value,
            "errors": [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                for e in errors
            ],
        }
        return JSONResponse(body, status_code=422)

    app.include_router(api_router)
    app.include_router(ui_router)
    swagger_dir = swagger_ui_bundle.swagger_ui_path
    app.mount("/static/swagger", StaticFiles(directory=swagger_dir), name="swagger")

    @app.get("/api/v1/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/api/v1/openapi.json",
            title="itloop API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
        )

    app.add_middleware(LimitBodySize, max_bytes=settings.max_body_bytes)
    app.add_middleware(RefuseCredentialsInUrl)
    return app
