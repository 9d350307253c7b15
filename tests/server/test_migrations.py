"""The migrations build exactly the ORM's schema, and revert cleanly, on SQLite and PostgreSQL."""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from itloop.server import migrate
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import (
    Base,
    ElectrodeArray,
    Protocol,
    RecordingSession,
    RecordingSite,
    Rig,
    Subject,
)

VERSIONS = Path(migrate.__file__).resolve().parents[1] / "migrations" / "versions"

pytestmark = pytest.mark.db


def _schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_object": lambda obj, name, type_, reflected, compare_to: (
                        not (
                            type_ == "table"
                            and (name == "alembic_version" or str(name).startswith("dbos"))
                        )
                    ),
                },
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_matches_the_orm(db_url: str) -> None:
    migrate.upgrade(db_url)
    assert migrate.current_revision(db_url) == migrate.head_revision(db_url)
    assert _schema_diff(db_url) == []

    migrate.downgrade(db_url, "base")
    assert migrate.current_revision(db_url) is None
    engine = make_engine(db_url)
    left = set(inspect(engine).get_table_names()) - {"alembic_version"}
    engine.dispose()
    assert left & set(Base.metadata.tables) == set()

    migrate.upgrade(db_url)
    assert _schema_diff(db_url) == []


def test_orphan_rows_are_refused_by_the_database(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions() as db:
            db.add(RecordingSite(array_id=424242, electrode=1, acq_channel=1))
            with pytest.raises(IntegrityError):
                db.commit()
        with sessions() as db:
            db.add(
                RecordingSession(
                    subject_id=1, rig_id=1, protocol_id=1, scheduled_for=dt.datetime.now(dt.UTC)
                )
            )
            with pytest.raises(IntegrityError):
                db.commit()
        with sessions() as db:
            assert db.query(RecordingSite).count() == 0
            assert db.query(RecordingSession).count() == 0
            subject = Subject(name="M1")
            db.add_all([subject, Rig(name="r"), Protocol(name="p", eps_l2=[1.0])])
            db.flush()
            array = ElectrodeArray(subject_id=subject.id, name="aIT")
            db.add(array)
            db.flush()
            db.add(RecordingSite(array_id=array.id, electrode=0, acq_channel=0))
            db.commit()
            # a parent with children cannot be deleted out from under them
            db.delete(subject)
            with pytest.raises(IntegrityError):
                db.commit()
    finally:
        engine.dispose()


def test_check_constraints_are_enforced(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as db:
            db.add(Protocol(name="bad window", eps_l2=[1.0], window_start_ms=170, window_end_ms=70))
            with pytest.raises(IntegrityError):
                db.commit()
    finally:
        engine.dispose()


def test_revisions_import_only_alembic_and_sqlalchemy() -> None:
    revisions = sorted(VERSIONS.glob("*.py"))
    assert revisions, f"no revisions in {VERSIONS}"
    for path in revisions:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                assert root in {"alembic", "sqlalchemy", "collections", "typing", "__future__"}, (
                    f"{path.name} imports {name}"
                )


def test_sqlite_connections_have_foreign_keys_and_wal(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    try:
        for _ in range(3):  # every pooled connection, not only the first
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()
