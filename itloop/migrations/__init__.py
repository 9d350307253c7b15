"""Alembic migrations: frozen revisions that import only alembic and sqlalchemy."""
