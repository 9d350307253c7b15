"""Fault tests against a real server process: the client killed mid-upload and restarted, the
server stopped for a while and restarted. Every presentation ends on the server exactly once
and the spool ends empty."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from itloop.rig_client.acquisition import FakeSpikeSource
from itloop.rig_client.batch import pull_batch
from itloop.rig_client.hardware import FakeEventOutput, FakeEyeTracker
from itloop.rig_client.presentation import HeadlessPresenter, run_session
from itloop.rig_client.runner import counted_presentations, spool_session
from itloop.rig_client.server_client import RigServerClient
from itloop.rig_client.spool import Spool

from .conftest import RigLab, free_port, make_rig_lab

pytestmark = [pytest.mark.slow, pytest.mark.db]
N_IMAGES, REPEATS = 20, 5
SERVER = """
import sys
import uvicorn
from itloop.server.app import create_app
from itloop.server.settings import Settings

settings = Settings(environment="test", data_dir=sys.argv[1], database_url=sys.argv[2])
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
"""


@dataclass
class LiveServer:
    url: str
    db_url: str
    data_dir: Path
    port: int
    script: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), str(self.data_dir), self.db_url, str(self.port)]
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stored(self, session_id: int) -> tuple[int, int, int]:
        """(presentations uploaded, response rows, distinct presentations with responses)."""
        from itloop.server.db import make_engine
        from itloop.server.db.tables import Presentation, Response

        engine = make_engine(self.db_url)
        with engine.connect() as db:
            uploaded = db.scalar(
                select(func.count())
                .select_from(Presentation)
                .where(Presentation.session_id == session_id, Presentation.uploaded_at.is_not(None))
            )
            rows = db.scalar(select(func.count()).select_from(Response))
            distinct = db.scalar(select(func.count(func.distinct(Response.presentation_id))))
        engine.dispose()
        return int(uploaded or 0), int(rows or 0), int(distinct or 0)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[LiveServer, RigLab, Path]]:
    """A server process on a published session, and a rig config file pointing at it."""
    from itloop.server import migrate
    from itloop.server.settings import Settings

    db_url = f"sqlite:///{tmp_path / 'server.sqlite3'}"
    migrate.upgrade(db_url)
    settings = Settings(environment="test", data_dir=tmp_path / "server", database_url=db_url)
    settings.prepare_data_dir()
    lab = make_rig_lab(db_url, settings.artifact_dir, n_images=N_IMAGES, repeats=REPEATS)
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SERVER))
    port = free_port()
    server = LiveServer(f"http://127.0.0.1:{port}", db_url, tmp_path / "server", port, script)
    server.start()
    token = tmp_path / "rig.token"
    token.write_text(lab.rig_token)
    config = tmp_path / "itloop-rig.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            server_url = "{server.url}"
            token_file = "rig.token"
            data_dir = "rig"
            presenter = "headless"
            [monitor]
            width_cm = 53.0
            distance_cm = 57.0
            width_px = 1920
            height_px = 1080
            refresh_hz = 60.0
            [upload]
            chunk_presentations = 1
            backoff_initial_s = 0.1
            backoff_max_s = 0.5
            max_attempts = 60
            [acquisition]
            kind = "replay"
            path = "recorded.nev"
            """
        )
    )
    try:
        yield server, lab, config
    finally:
        server.stop()


@pytest.fixture
def live(
    live_server: tuple[LiveServer, RigLab, Path], tmp_path: Path
) -> tuple[LiveServer, RigLab, Path]:
    """The live server with the whole session counted into the rig's spool."""
    server, lab, config = live_server
    with RigServerClient(server.url, lab.rig_token) as client:
        manifest = pull_batch(client, lab.session_id, tmp_path / "rig" / "batches").batch.manifest
        client.transition(lab.session_id, "running")
    log = run_session(manifest, HeadlessPresenter(FakeEventOutput(), FakeEyeTracker()))
    onsets = [round((r.onset_s or 0) * 30_000) for r in log.records]
    recording = FakeSpikeSource(
        30_000,
        {c: [o + 3000 for o in onsets] for c in lab.acq_channels},
        onsets,
        [r.event_code for r in log.records],
    ).read()
    with Spool(tmp_path / "rig" / "spool.sqlite3") as spool:
        spool_session(spool, manifest, counted_presentations(manifest, log.records, recording))
    return server, lab, config


def upload_process(config: Path, session_id: int) -> subprocess.Popen[bytes]:
    code = "from itloop.rig_client.cli import app; app()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "upload", str(session_id), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def wait_for_stored(server: LiveServer, session_id: int, at_least: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        uploaded = server.stored(session_id)[0]
        if uploaded >= at_least:
            return uploaded
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} presentations stored after 60 s")


def assert_exactly_once(server: LiveServer, lab: RigLab, config: Path) -> None:
    total = lab.n_planned
    assert server.stored(lab.session_id) == (total, total, total)
    with Spool(config.parent / "rig" / "spool.sqlite3") as spool:
        status = spool.status(lab.session_id)
    assert status.empty
    assert status.sent == status.generated == total
    assert status.quarantined == 0


def test_client_killed_mid_upload_then_restarted(
    live: tuple[LiveServer, RigLab, Path],
) -> None:
    server, lab, config = live
    proc = upload_process(config, lab.session_id)
    stored_before_kill = wait_for_stored(server, lab.session_id, 5)
    proc.kill()
    proc.communicate(timeout=10)
    assert stored_before_kill < lab.n_planned
    rerun = upload_process(config, lab.session_id)
    _out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()
    assert_exactly_once(server, lab, config)


def test_server_cut_off_then_restarted(live: tuple[LiveServer, RigLab, Path]) -> None:
    server, lab, config = live
    proc = upload_process(config, lab.session_id)
    wait_for_stored(server, lab.session_id, 5)
    server.stop()
    time.sleep(1.5)
    assert proc.poll() is None  # still backing off, not given up
    server.start()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert "retrying" in err.decode()
    assert_exactly_once(server, lab, config)


def test_cli_pull_run_with_replay_and_status(live_server: tuple[LiveServer, RigLab, Path]) -> None:
    """`itloop rig pull`, `run --headless` replaying a NEV written by the writer, `status`."""
    import json

    import numpy as np
    from typer.testing import CliRunner

    from itloop.rig_client.cli import app
    from itloop.rig_client.nev import NevHeader, NevSegment, write_nev

    server, lab, config = live_server
    rng = np.random.default_rng(0)
    write_nev(
        config.parent / "recorded.nev",
        NevHeader(channels=lab.acq_channels),
        [
            NevSegment(
                {c: np.sort(rng.choice(300_000, 3000, replace=False)) for c in lab.acq_channels},
                stop_ticks=300_000,
            )
        ],
    )
    runner = CliRunner()
    args = ["--config", str(config)]
    pulled = runner.invoke(app, ["pull", str(lab.session_id), *args])
    assert pulled.exit_code == 0, pulled.output
    assert f"{lab.n_planned} presentations verified" in pulled.output
    ran = runner.invoke(app, ["run", str(lab.session_id), "--headless", *args])
    assert ran.exit_code == 0, ran.output
    status = runner.invoke(app, ["status", "--json", *args])
    (row,) = json.loads(status.stdout)["sessions"]
    assert row["empty"]
    assert row["sent"] == row["generated"] == lab.n_planned
    assert server.stored(lab.session_id) == (lab.n_planned,) * 3
    assert lab.rig_token not in pulled.output + ran.output + status.output
    with RigServerClient(server.url, lab.rig_token) as client:
        assert client.session_state(lab.session_id) == "uploaded"
    replayed = config.parent / "rig" / f"session-{lab.session_id}-replay.nev"
    inspected = runner.invoke(app, ["inspect", str(replayed), "--json"])
    assert json.loads(inspected.stdout)["n_events"] == lab.n_planned
