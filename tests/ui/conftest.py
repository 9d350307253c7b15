"""The app on a fresh, migrated database with a seeded lab and one account per role."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from itloop.server import accounts, migrate
from itloop.server.app import create_app
from itloop.server.artifacts import ContentStore
from itloop.server.auth import read_session_cookie
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import Role
from itloop.server.settings import Settings

from ..exports.seeding import SeededLab, seed_lab

PASSWORD = "correct horse battery"
EMAILS = {role: f"{role.value}@lab.test" for role in Role}


@dataclass
class UiLab:
    app: FastAPI
    engine: Engine
    sessions: sessionmaker[Session]
    settings: Settings
    store: ContentStore
    lab: SeededLab


def build(db_url: str, data_dir: Path, *, n_days: int = 3) -> UiLab:
    migrate.upgrade(db_url)
    settings = Settings(environment="test", data_dir=data_dir, database_url=db_url)
    settings.prepare_data_dir()
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    store = ContentStore(settings.artifact_dir)
    lab = seed_lab(sessions, store, n_days=n_days)
    with sessions() as db:
        for role, email in EMAILS.items():
            accounts.create_user(
                db, email=email, password=PASSWORD, role=role, display_name=role.value.title()
            )
    app = create_app(settings, engine=engine)
    return UiLab(app, engine, sessions, settings, store, lab)


@pytest.fixture
def ui(db_url: str, tmp_path: Path) -> Iterator[UiLab]:
    built = build(db_url, tmp_path / "data")
    yield built
    built.engine.dispose()


def login(client: TestClient, role: Role) -> str:
    """Log ``client`` in as the account of ``role``; returns the session's CSRF token."""
    answer = client.post(
        "/login", data={"email": EMAILS[role], "password": PASSWORD}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    data = read_session_cookie(settings, client.cookies[settings.session_cookie_name])
    assert data is not None
    return str(data["csrf"])


@pytest.fixture
def client(ui: UiLab) -> Iterator[TestClient]:
    with TestClient(ui.app) as test_client:
        yield test_client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    ui: UiLab


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    """The real app served by uvicorn on a free loopback port (SQLite, fresh)."""
    built = build(f"sqlite:///{tmp_path / 'itloop.sqlite3'}", tmp_path / "data")
    port = _free_port()
    config = uvicorn.Config(built.app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-ui-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/api/v1/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield LiveServer(url, built)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        built.engine.dispose()


def today_plus(days: int) -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days)).isoformat()
