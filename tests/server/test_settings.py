"""Settings refuse unsafe values with a message that names the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from itloop.server.settings import DEV_SECRET_KEY, Settings


def test_default_secret_key_is_refused_outside_dev(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="ITLOOP_SECRET_KEY is the built-in development key"):
        Settings(environment="production", data_dir=tmp_path / "d")
    assert (
        Settings(environment="dev", data_dir=tmp_path / "d").secret_key.get_secret_value()
        == DEV_SECRET_KEY
    )


def test_short_secret_key_is_refused_in_production(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="has 5 characters"):
        Settings(environment="production", secret_key="short", data_dir=tmp_path / "d")
    ok = Settings(environment="production", secret_key="k" * 40, data_dir=tmp_path / "d")
    assert ok.environment == "production"


def test_world_readable_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "open"
    data.mkdir()
    data.chmod(0o777)
    with pytest.raises(ValidationError, match="world-accessible"):
        Settings(data_dir=data)
    data.chmod(0o700)
    assert Settings(data_dir=data).data_dir == data


def test_prepared_data_dir_is_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh")
    settings.prepare_data_dir()
    assert (tmp_path / "fresh").stat().st_mode & 0o077 == 0
    assert settings.effective_database_url.endswith("fresh/itloop.sqlite3")
    assert settings.is_embedded
    assert settings.runs_worker_in_process


def test_environment_variables_are_read_with_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITLOOP_DATABASE_URL", "postgresql://u@db:5432/itloop")
    monkeypatch.setenv("ITLOOP_DATA_DIR", str(tmp_path / "d"))
    settings = Settings()
    assert settings.effective_database_url == "postgresql+psycopg://u@db:5432/itloop"
    assert not settings.is_embedded
    assert not settings.runs_worker_in_process


def test_unknown_database_and_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="mysql://x"):
        Settings(database_url="mysql://x", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="databse_url"):
        Settings(databse_url="sqlite://", data_dir=tmp_path)  # type: ignore[call-arg]


def test_a_retired_variable_is_refused_naming_its_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITLOOP_GENERATION_CHUNK_BATCHES", "8")
    with pytest.raises(
        ValidationError,
        match=r"ITLOOP_GENERATION_CHUNK_BATCHES='8' is no longer read; use "
        r"ITLOOP_GENERATION_CHUNK_ROWS",
    ):
        Settings(data_dir=tmp_path / "d")
    monkeypatch.delenv("ITLOOP_GENERATION_CHUNK_BATCHES")
    monkeypatch.setenv("itloop_generation_chunk_batches", "8")
    with pytest.raises(ValidationError, match="itloop_generation_chunk_batches='8'"):
        Settings(data_dir=tmp_path / "d")
    monkeypatch.delenv("itloop_generation_chunk_batches")
    assert Settings(data_dir=tmp_path / "d").generation_chunk_rows == 4096
