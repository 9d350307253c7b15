"""Alembic environment: runs against the URL the caller puts in the config."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlalchemy import Connection

from itloop.server.db.engine import make_engine
from itloop.server.db.tables import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# Tables that live in the same database but belong to the durable job engine.
FOREIGN_TABLE_PREFIXES = ("dbos_",)
FOREIGN_SCHEMAS = ("dbos",)


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    if type_ == "table" and name is not None:
        if name.startswith(FOREIGN_TABLE_PREFIXES) or name == "alembic_version":
            return False
        schema = getattr(obj, "schema", None)
        if schema in FOREIGN_SCHEMAS:
            return False
        if reflected and compare_to is None and name not in target_metadata.tables:
            return False
    return True


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render the app's column types as plain SQLAlchemy types, so revisions stay frozen."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        render_item=render_item,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL given to the migration environment")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
