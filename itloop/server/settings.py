"""Process settings: one object, built at start-up from ``ITLOOP_*`` variables and passed in."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET_KEY = "itloop-dev-secret-key-change-me"


RETIRED_VARIABLES = {
    "ITLOOP_GENERATION_CHUNK_BATCHES": "ITLOOP_GENERATION_CHUNK_ROWS (rows, about 512 a batch)",
}
"""Variables earlier versions read, each with what replaced it: a deployment that still sets one
is refused rather than silently run without it."""


class UnsafeSettingsError(ValueError):
    """A setting would make the server unsafe to run; the message names it and the fix."""


class Settings(BaseSettings):
    """Everything a server, worker or CLI process needs to know about its deployment."""

    model_config = SettingsConfigDict(env_prefix="ITLOOP_", extra="forbid", frozen=True)

    environment: Literal["dev", "test", "production"] = "dev"
    data_dir: Path = Path("itloop-data")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in data_dir"
    )
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    session_cookie_name: str = "itloop_session"
    session_max_age_s: int = Field(default=12 * 3600, gt=0)
    cookie_secure: bool = False
    in_process_worker: bool | None = Field(
        default=None, description="run a worker inside `serve`; default: only on embedded SQLite"
    )
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    refit_cron: str = "0 2 * * *"
    refit_timezone: str = "UTC"
    worker_concurrency: int = Field(default=1, ge=1)
    model_backbone: str = Field(default="resnet50", description="registered backbone of day 0")
    model_layer: str | None = Field(default=None, description="cut layer; default: the backbone's")
    model_checkpoint: Path | None = Field(
        default=None, description="lab-provided backbone checkpoint for day 0"
    )
    model_checkpoint_trusted: bool = Field(
        default=False, description="allow pickled (MadryLab robustness) checkpoints"
    )
    model_input_px: int = Field(default=224, ge=16, le=1024)
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    generation_chunk_rows: int = Field(
        default=4096,
        ge=1,
        description="a session's attacks are made in durable steps of about this many rows (each "
        "an image, site, ε and sign), whole batches of the attack engine; a worker restarted "
        "mid-generation makes at most one step again",
    )
    worker_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}$",
        description="durable identity of a worker (its DBOS executor id); keep it across "
        "restarts so a restarted worker resumes its unfinished jobs; default: "
        "'<host>-worker' (or '<host>-serve' for the in-process worker)",
    )

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("postgres://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgres://")
        elif value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"database_url {value!r}: only sqlite:// and postgresql:// are supported"
            )
        return value

    @model_validator(mode="after")
    def _refuse_retired(self) -> Settings:
        for name, value in os.environ.items():  # matched as pydantic-settings does: any case
            if name.upper() in RETIRED_VARIABLES:
                raise ValueError(
                    f"{name}={value!r} is no longer read; use {RETIRED_VARIABLES[name.upper()]}"
                )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if (
            self.environment == "production"
            and self.secret_key.get_secret_value() == DEV_SECRET_KEY
        ):
            raise UnsafeSettingsError(
                "ITLOOP_SECRET_KEY is the built-in development key; set a random value of at "
                "least 32 characters, e.g. from "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
            )
        if self.environment == "production" and len(self.secret_key.get_secret_value()) < 32:
            raise UnsafeSettingsError(
                f"ITLOOP_SECRET_KEY has {len(self.secret_key.get_secret_value())} characters; "
                "use at least 32"
            )
        if self.data_dir.exists():
            mode = self.data_dir.stat().st_mode
            if mode & stat.S_IWOTH or (os.name == "posix" and mode & stat.S_IROTH):
                raise UnsafeSettingsError(
                    f"data directory {str(self.data_dir)!r} is world-accessible "
                    f"(mode {stat.filemode(mode)}); run `chmod o-rwx {self.data_dir}`"
                )
        return self

    @property
    def effective_database_url(self) -> str:
        """The database URL in use: the configured one or the embedded SQLite file."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'itloop.sqlite3').resolve()}"

    @property
    def is_embedded(self) -> bool:
        """True when running on the embedded SQLite default."""
        return self.effective_database_url.startswith("sqlite")

    @property
    def runs_worker_in_process(self) -> bool:
        if self.in_process_worker is not None:
            return self.in_process_worker
        return self.is_embedded

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def prepare_data_dir(self) -> None:
        """Create the data directory (mode 0700) and its artifact store."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.artifact_dir.mkdir(mode=0o700, exist_ok=True)
