"""`itloop serve` on a fresh directory: migrates, prints a first admin, answers health and docs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_on_a_fresh_directory(tmp_path: Path) -> None:
    port = _free_port()
    data_dir = tmp_path / "itloop-data"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITLOOP_")}
    env.update({"ITLOOP_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "itloop", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 90
        health = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert health is not None, log.read_text()
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok"
        assert body["database"] == "sqlite"
        assert body["schema_revision"] is not None

        docs = httpx.get(f"http://127.0.0.1:{port}/api/v1/docs", timeout=5)
        assert docs.status_code == 200
        assert "/static/swagger/swagger-ui-bundle.js" in docs.text
        assert (
            httpx.get(f"http://127.0.0.1:{port}/static/swagger/swagger-ui-bundle.js").status_code
            == 200
        )
        spec = httpx.get(f"http://127.0.0.1:{port}/api/v1/openapi.json", timeout=5).json()
        assert "/api/v1/health" in spec["paths"]

        output = log.read_text()
        assert "first admin account" in output
        password = output.split("password: ", 1)[1].split()[0]
        login = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/auth/login",
            data={"email": "admin@localhost", "password": password},
        )
        assert login.status_code == 200
        # the worker started with the server takes jobs: a probe runs end to end
        csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
        cookies = login.cookies
        probe = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/jobs/probe",
            json={"duration_s": 0.2},
            headers=csrf,
            cookies=cookies,
        )
        assert probe.status_code == 202, probe.text
        job_url = f"http://127.0.0.1:{port}/api/v1/jobs/{probe.json()['id']}"
        deadline = time.monotonic() + 60
        while (state := httpx.get(job_url, cookies=cookies).json()["state"]) != "succeeded":
            assert state in ("queued", "running"), state
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert (data_dir / "itloop.sqlite3").exists()
        assert data_dir.stat().st_mode & 0o077 == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
