"""The rig configuration, and the import rules the package keeps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import itloop.rig_client
from itloop.rig_client.config import load_config
from itloop.rig_client.errors import ConfigError

CONFIG = """
server_url = "https://itloop.lab:8000"
{token}
[monitor]
width_cm = 53.0
distance_cm = 57.0
width_px = 1920
height_px = 1080
refresh_hz = 120.0
[stimulus]
size_deg = 8.0
[acquisition]
kind = "blackrock-file"
path = "recordings/session-{{session}}.nev"
"""


def write(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "itloop-rig.toml"
    path.write_text(CONFIG.format(token=token))
    return path


def test_token_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_RIG_TOKEN", "s3cret-token")
    config = load_config(write(tmp_path, 'token_env = "LAB_RIG_TOKEN"'))
    assert config.token().get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(config) + repr(config.token())
    assert config.acquisition is not None
    assert config.acquisition.path_for(4) == tmp_path / "recordings" / "session-4.nev"
    assert config.spool_path.parent == tmp_path / "itloop-rig"


def test_token_from_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-token\n")
    config = load_config(write(tmp_path, 'token_file = "token"'))
    assert config.token().get_secret_value() == "file-token"


def test_missing_token_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    config = load_config(write(tmp_path, 'token_env = "NOPE_TOKEN"'))
    with pytest.raises(ConfigError, match="NOPE_TOKEN"):
        config.token()


def test_token_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token_file or token_env"):
        load_config(write(tmp_path, 'token = "abc"'))


def test_bad_value_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.write_text(path.read_text().replace("distance_cm = 57.0", "distance_cm = -1"))
    with pytest.raises(ConfigError, match=r"monitor.distance_cm.*-1"):
        load_config(path)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_one_module_imports_psychopy_and_only_acquisition_imports_neo() -> None:
    package = Path(itloop.rig_client.__file__).parent
    modules = {p.name: _imports(p) for p in package.glob("*.py")}
    assert [m for m, names in modules.items() if "psychopy" in names] == ["psychopy_presenter.py"]
    assert [m for m, names in modules.items() if "neo" in names] == ["blackrock.py"]
    posix_only = {"fcntl", "pwd", "grp", "termios", "resource", "posix"}
    assert not [m for m, names in modules.items() if names & posix_only]
    assert not [m for m, names in modules.items() if names & {"torch", "sqlalchemy"}]
