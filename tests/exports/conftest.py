"""A migrated database with seeded, recorded days, and the app with the export routes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from itloop.server import accounts, migrate
from itloop.server.app import create_app
from itloop.server.artifacts import ContentStore
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import Role, TokenKind
from itloop.server.settings import Settings

from .seeding import SeededLab, seed_lab


@dataclass
class Recorded:
    sessions: sessionmaker[Session]
    store: ContentStore
    lab: SeededLab
    client: TestClient
    analyst_token: str
    staff_token: str


@pytest.fixture
def recorded(db_url: str, tmp_path: Path) -> Iterator[Recorded]:
    migrate.upgrade(db_url)
    settings = Settings(environment="test", data_dir=tmp_path / "data", database_url=db_url)
    settings.prepare_data_dir()
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    store = ContentStore(settings.artifact_dir)
    lab = seed_lab(sessions, store, n_days=2)
    tokens = {}
    with sessions() as db:
        for role in (Role.analyst, Role.staff):
            user = accounts.create_user(
                db, email=f"{role.value}@lab.test", password="correct horse battery", role=role
            )
            _, tokens[role] = accounts.create_token(
                db, name=role.value, kind=TokenKind.user, user_id=user.id
            )
    app = create_app(settings, engine=engine)
    with TestClient(app) as client:
        yield Recorded(sessions, store, lab, client, tokens[Role.analyst], tokens[Role.staff])
    engine.dispose()
