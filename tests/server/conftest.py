"""An app on a fresh, migrated database, with helpers to make accounts and tokens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from itloop.server import accounts, migrate
from itloop.server.app import create_app
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import Base, Rig, Role, TokenKind
from itloop.server.settings import Settings


@dataclass
class Server:
    client: TestClient
    engine: Engine
    sessions: sessionmaker[Session]
    settings: Settings

    def user_token(self, role: Role, email: str | None = None) -> str:
        with self.sessions() as db:
            user = accounts.create_user(
                db,
                email=email or f"{role.value}@lab.test",
                password="correct horse battery",
                role=role,
            )
            _, secret = accounts.create_token(
                db, name=f"{role.value} token", kind=TokenKind.user, user_id=user.id
            )
        return secret

    def rig(self, name: str) -> int:
        with self.sessions() as db:
            rig = Rig(name=name)
            db.add(rig)
            db.commit()
            return rig.id

    def rig_token(self, rig_id: int) -> str:
        with self.sessions() as db:
            _, secret = accounts.create_token(
                db, name=f"rig {rig_id}", kind=TokenKind.rig, rig_id=rig_id
            )
        return secret

    def worker_token(self) -> str:
        with self.sessions() as db:
            _, secret = accounts.create_token(db, name="worker", kind=TokenKind.worker)
        return secret

    def count(self, table: type[Base]) -> int:
        with self.sessions() as db:
            return int(db.scalar(select(func.count()).select_from(table)) or 0)

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
                for name, table in Base.metadata.tables.items()
            }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    migrate.upgrade(db_url)
    data_dir = tmp_path / "data"
    settings = Settings(environment="test", data_dir=data_dir, database_url=db_url)
    settings.prepare_data_dir()
    engine = make_engine(db_url)
    app = create_app(settings, engine=engine)
    with TestClient(app) as client:
        yield Server(client, engine, make_sessionmaker(engine), settings)
    engine.dispose()
