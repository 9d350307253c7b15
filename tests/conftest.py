"""Fixtures shared by the whole suite: a fresh database per test on SQLite or PostgreSQL."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get(
    "ITLOOP_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _enabled_databases() -> list[str]:
    raw = os.environ.get("ITLOOP_TEST_DATABASES", "sqlite,postgresql")
    return [name.strip() for name in raw.split(",") if name.strip()]


def _postgres_reason() -> str | None:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure to reach the server
        return f"no PostgreSQL server answers at {make_url(PG_ADMIN_URL).render_as_string()}: {exc}"
    return None


@pytest.fixture(scope="session")
def postgres_unavailable() -> str | None:
    return _postgres_reason()


def create_postgres_database() -> str:
    name = f"itloop_test_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=_enabled_databases())
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_unavailable: str | None
) -> Iterator[str]:
    """The URL of a fresh, empty database: a SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'itloop.sqlite3'}"
        return
    if request.param != "postgresql":
        raise ValueError(f"ITLOOP_TEST_DATABASES names unknown database {request.param!r}")
    if postgres_unavailable:
        pytest.skip(postgres_unavailable)
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture
def shared_data() -> Path:
    """The real recordings beside the project; tests that need them skip where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real recordings not available at {SHARED_DATA}")
    return SHARED_DATA
