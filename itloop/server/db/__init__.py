"""The server's database: engine, typed ORM tables and unit-of-work sessions."""

from itloop.server.db.engine import make_engine, make_sessionmaker
from itloop.server.db.tables import Base

__all__ = ["Base", "make_engine", "make_sessionmaker"]
