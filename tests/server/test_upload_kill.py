"""SIGKILL the server in the middle of an upload: the retried upload stores everything once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from itloop.server import migrate
from itloop.server.app import create_app
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import Presentation, Response, SessionState
from itloop.server.settings import Settings

from .conftest import Server
from .lab_fixture import make_lab
from .test_serve import _free_port

pytestmark = [pytest.mark.db, pytest.mark.slow]


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "itloop", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail(log.read_text())


def test_upload_survives_a_killed_server(db_url: str, tmp_path: Path) -> None:
    migrate.upgrade(db_url)
    data_dir = tmp_path / "data"
    settings = Settings(environment="test", data_dir=data_dir, database_url=db_url)
    settings.prepare_data_dir()
    engine = make_engine(db_url)
    with TestClient(create_app(settings, engine=engine)) as client:
        server = Server(client, engine, make_sessionmaker(engine), settings)
        lab = make_lab(server, n_sites=64, n_images=2000)
        token = server.rig_token(lab.rig_id)
        with server.sessions() as db:
            from itloop.server.db.tables import RecordingSession

            session = db.get(RecordingSession, lab.session_id)
            assert session is not None
            session.state = SessionState.running
            db.commit()
    presentations = [
        {
            "seq": seq,
            "stimulus_id": lab.stimulus_ids[seq],
            "event_code": 100 + seq,
            "onset_ticks": 30_000 + 6_000 * seq,
            "tick_rate_hz": 30_000,
            "fixation_ok": True,
            "frame_drops": 0,
            "counts": [(seq * 7 + j) % 23 for j in range(64)],
        }
        for seq in range(lab.n_planned)
    ]
    body = json.dumps(
        {
            "window_start_ms": 70.0,
            "window_end_ms": 170.0,
            "site_ids": lab.site_ids,
            "presentations": presentations,
        }
    ).encode()
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Idempotency-Key": "kill-test-chunk-0001",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ITLOOP_", "DBOS_"))}
    env.update(
        ITLOOP_ENVIRONMENT="test",
        ITLOOP_DATA_DIR=str(data_dir),
        ITLOOP_DATABASE_URL=db_url,
        ITLOOP_IN_PROCESS_WORKER="false",
    )
    port, log = _free_port(), tmp_path / "serve.log"
    proc = _serve(env, port, log)
    _wait_healthy(port, proc, log)
    url = f"http://127.0.0.1:{port}/api/v1/sessions/{lab.session_id}/uploads"
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(httpx.post(url, content=body, headers=headers, timeout=60).status_code)
        except httpx.TransportError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.15)  # the body is on its way or being stored
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    sender.join(60)
    assert outcome, "the first attempt never returned"

    proc = _serve(env, port, log)
    try:
        _wait_healthy(port, proc, log)
        retried = httpx.post(url, content=body, headers=headers, timeout=60)
        assert retried.status_code in (200, 201), retried.text
        again = httpx.post(url, content=body, headers=headers, timeout=60)
        assert again.status_code == 200
        assert again.json() == retried.json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with make_sessionmaker(engine)() as db:
        uploaded = db.scalar(
            select(func.count())
            .select_from(Presentation)
            .where(Presentation.uploaded_at.isnot(None))
        )
        stored = db.scalar(select(func.count()).select_from(Response))
    assert uploaded == lab.n_planned
    assert stored == lab.n_planned
    engine.dispose()
