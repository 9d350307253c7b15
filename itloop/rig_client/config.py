"""The rig's configuration: one TOML file, read at start-up and passed in.

The rig token is read from an environment variable or a file, never from the TOML file itself
or the command line, and is kept as a ``SecretStr`` so it cannot leak into logs or reprs.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from itloop.rig_client.errors import ConfigError

DEFAULT_CONFIG = Path("itloop-rig.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MonitorConfig(_Section):
    width_cm: float = Field(gt=0)
    distance_cm: float = Field(gt=0)
    width_px: int = Field(gt=0)
    height_px: int = Field(gt=0)
    refresh_hz: float = Field(gt=0, description="expected; durations use the measured rate")
    fullscreen: bool = True
    screen: int = Field(default=0, ge=0)


class StimulusConfig(_Section):
    size_deg: float = Field(
        default=8.0,
        gt=0,
        description="expected size; the batch's own size_deg wins, with a note",
    )
    photodiode_px: int = Field(default=40, ge=4)


class EventOutputConfig(_Section):
    kind: Literal["fake", "parallel"] = "fake"
    address: int = 0x378


class AcquisitionConfig(_Section):
    kind: Literal["blackrock-file", "replay"] = "blackrock-file"
    path: str = Field(description="recording file; '{session}' is replaced by the session id")
    tail_ms: float = Field(default=1000.0, ge=0, description="replay only: recording after the end")

    def path_for(self, session_id: int) -> Path:
        return Path(self.path.replace("{session}", str(session_id)))


class UploadConfig(_Section):
    chunk_presentations: int = Field(default=500, ge=1, le=50_000)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)


class RigConfig(_Section):
    server_url: str = Field(pattern=r"^https?://")
    token_env: str | None = "ITLOOP_RIG_TOKEN"
    token_file: Path | None = None
    data_dir: Path = Path("itloop-rig")
    presenter: Literal["psychopy", "headless"] = "psychopy"
    monitor: MonitorConfig
    stimulus: StimulusConfig = StimulusConfig()
    events: EventOutputConfig = EventOutputConfig()
    acquisition: AcquisitionConfig | None = None
    upload: UploadConfig = UploadConfig()

    @model_validator(mode="after")
    def _token_source(self) -> RigConfig:
        if not self.token_env and not self.token_file:
            raise ValueError("set token_env or token_file: the rig token has no source")
        return self

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool.sqlite3"

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / "batches"

    def token(self) -> SecretStr:
        """The rig token from ``token_file`` if set, else from the ``token_env`` variable."""
        if self.token_file is not None:
            try:
                value = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read token_file {self.token_file}: {exc}") from exc
            if not value:
                raise ConfigError(f"token_file {self.token_file} is empty")
            return SecretStr(value)
        name = self.token_env or ""
        value = os.environ.get(name, "").strip()
        if not value:
            raise ConfigError(f"environment variable {name} holding the rig token is not set")
        return SecretStr(value)


def load_config(path: Path = DEFAULT_CONFIG) -> RigConfig:
    """Read and validate the TOML file; relative paths in it are relative to the file."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"no rig configuration at {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for forbidden in ("token", "rig_token"):
        if forbidden in raw:
            raise ConfigError(
                f"{path} contains {forbidden!r}; put the token in token_file or token_env"
            )
    try:
        config = RigConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']} (got {first.get('input')!r})") from exc
    base = Path(path).resolve().parent
    updates: dict[str, object] = {"data_dir": base / config.data_dir}
    if config.token_file is not None:
        updates["token_file"] = base / config.token_file
    if config.acquisition is not None and not Path(config.acquisition.path).is_absolute():
        updates["acquisition"] = config.acquisition.model_copy(
            update={"path": str(base / config.acquisition.path)}
        )
    return config.model_copy(update=updates)
