"""The command line against a real database: migrations, accounts and tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from itloop import __version__
from itloop.cli import app
from itloop.server import migrate
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import ApiToken, Rig, User
from itloop.server.security import parse_token

runner = CliRunner()


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ITLOOP_DATABASE_URL", db_url)
    monkeypatch.setenv("ITLOOP_DATA_DIR", str(tmp_path / "data"))
    return db_url


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_version() -> None:
    assert __version__ in invoke("--version")


@pytest.mark.db
def test_db_upgrade_downgrade_current(env: str) -> None:
    head = migrate.head_revision(env)
    assert f"at revision {head}" in invoke("db", "upgrade")
    assert f"current: {head}" in invoke("db", "current")
    assert "at revision None" in invoke("db", "downgrade", "base")
    invoke("db", "upgrade")
    assert migrate.current_revision(env) == head


@pytest.mark.db
def test_user_add_and_token_lifecycle(env: str) -> None:
    invoke("db", "upgrade")
    out = invoke("user", "add", "ana@lab.test", "--role", "analyst", "--password", "long enough pw")
    assert "ana@lab.test (analyst)" in out
    duplicate = runner.invoke(
        app, ["user", "add", "ANA@lab.test", "--role", "staff", "--password", "long enough pw"]
    )
    assert duplicate.exit_code == 1
    assert "exists" in duplicate.output

    engine = make_engine(env)
    with make_sessionmaker(engine)() as db:
        db.add(Rig(name="rig-1"))
        db.commit()
    created = runner.invoke(app, ["token", "create", "rig one", "--kind", "rig", "--rig", "rig-1"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    assert parse_token(secret) is not None

    listing = invoke("token", "list")
    assert "rig one" in listing
    assert secret not in listing

    with make_sessionmaker(engine)() as db:
        token = db.query(ApiToken).one()
        assert token.rig_id is not None
        assert secret.split("_", 2)[2] not in token.secret_sha256
        token_id = token.id
    assert f"token {token_id} revoked" in invoke("token", "revoke", str(token_id))
    assert "rig one" not in invoke("token", "list")
    assert "rig one" in invoke("token", "list", "--all")
    engine.dispose()


@pytest.mark.db
def test_bad_cli_input_names_the_value_and_stores_nothing(env: str) -> None:
    invoke("db", "upgrade")
    bad_role = runner.invoke(
        app, ["user", "add", "x@lab.test", "--role", "boss", "--password", "p" * 12]
    )
    assert bad_role.exit_code == 1
    assert "'boss'" in bad_role.output
    no_rig = runner.invoke(app, ["token", "create", "t", "--kind", "rig", "--rig", "nowhere"])
    assert no_rig.exit_code == 1
    assert "'nowhere'" in no_rig.output
    engine = make_engine(env)
    with make_sessionmaker(engine)() as db:
        assert db.query(User).count() == 0
        assert db.query(ApiToken).count() == 0
    engine.dispose()


def test_unsafe_settings_stop_the_cli_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITLOOP_ENVIRONMENT", "production")
    monkeypatch.setenv("ITLOOP_DATA_DIR", str(tmp_path / "d"))
    result = runner.invoke(app, ["db", "current"])
    assert result.exit_code == 2
    assert "ITLOOP_SECRET_KEY" in result.output


@pytest.mark.parametrize(
    ("bench", "option"), [("attack", "--gradient-dtype"), ("shards", "--nproc-per-node")]
)
def test_bench_help_lists_the_benchmarks_own_options(bench: str, option: str) -> None:
    printed = invoke("bench", bench, "--help")
    assert f"usage: itloop bench {bench}" in printed
    assert option in printed
