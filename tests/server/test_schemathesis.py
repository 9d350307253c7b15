"""Property-based API tests: generated requests never get a server error or break the schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from itloop.server import migrate
from itloop.server.app import create_app
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import Role
from itloop.server.settings import Settings

from .conftest import Server
from .lab_fixture import make_lab

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
CASES = {"n": 0}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root: Path = tmp_path_factory.mktemp("schemathesis")
    url = f"sqlite:///{root / 'itloop.sqlite3'}"
    migrate.upgrade(url)
    settings_ = Settings(environment="test", data_dir=root / "data", database_url=url)
    settings_.prepare_data_dir()
    engine = make_engine(url)
    app = create_app(settings_, engine=engine)
    with TestClient(app) as client:
        server = Server(client, engine, make_sessionmaker(engine), settings_)
        make_lab(server)
        token = server.user_token(Role.admin)
        yield {"app": app, "token": token}
    engine.dispose()


def _operations(app: Any) -> list[Any]:
    loaded = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    return [result.ok() for result in loaded.get_all_operations()]


def test_api_conforms_to_its_schema(api: dict[str, Any]) -> None:
    """Every operation, authenticated as an admin, with generated parameters and bodies."""
    headers = {"Authorization": f"Bearer {api['token']}"}
    operations = _operations(api["app"])
    assert len(operations) >= 25
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def run(case: Any) -> None:
            CASES["n"] += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        run()
    assert CASES["n"] >= 1000, f"only {CASES['n']} generated cases"
