"""SIGKILL the worker halfway through a generation: the restarted worker publishes it once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from itloop.protocol.batches import BatchManifest
from itloop.protocol.jobs import JobKind
from itloop.server import migrate
from itloop.server.artifacts import ContentStore
from itloop.server.batches import build_manifest
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import (
    Batch,
    Job,
    Presentation,
    RecordingSession,
    SessionState,
    Stimulus,
)
from itloop.server.jobs import JobService
from itloop.server.settings import Settings

from .generation_setup import schedule_session, wait_for_job, worker_env
from .test_loop_e2e import image_folder

pytestmark = [pytest.mark.db, pytest.mark.slow]

N_SITES = 16  # 32 pairs of 2 rows, two chunks of one batch of 32: the kill lands between them


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "itloop", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_killed_generation_resumes_and_publishes_once(db_url: str, tmp_path: Path) -> None:
    migrate.upgrade(db_url)
    data_dir = tmp_path / "data"
    settings = Settings(environment="test", data_dir=data_dir, database_url=db_url)
    settings.prepare_data_dir()
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    images = image_folder(tmp_path / "images", classes=8, per_class=6)
    session_id = schedule_session(
        sessions, images, name="kill", sites=N_SITES, eps_l2=[1.0], attack_steps=40
    )
    jobs = JobService(settings, sessions)
    job = jobs.enqueue(JobKind.generate, {"session_id": session_id}, key=f"session-{session_id}")

    env = worker_env(
        data_dir,
        ITLOOP_DATABASE_URL=db_url,
        ITLOOP_WORKER_ID="kill-worker",
        ITLOOP_GENERATION_CHUNK_ROWS="32",
    )
    log = tmp_path / "worker.log"
    first = _worker(env, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            with sessions() as db:
                row = db.get(Job, job.id)
                assert row is not None
                progress = row.progress
            if progress > 0:  # the first chunk is done, the second is running
                break
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        with sessions() as db:
            assert db.scalar(select(func.count()).select_from(Batch)) == 0
            assert db.get(RecordingSession, session_id).state is SessionState.generating  # type: ignore[union-attr]

        second = _worker(env, log)
        try:
            attempts = wait_for_job(sessions, job.id, second, log, timeout_s=240)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        jobs.close()

    with sessions() as db:
        assert attempts == 2
        assert db.scalar(select(func.count()).select_from(Batch)) == 1
        session = db.get(RecordingSession, session_id)
        assert session is not None
        assert session.state is SessionState.ready
        n_stimuli = db.scalar(select(func.count()).select_from(Stimulus))
        # per site: 2 clean images, each with one attack and one noise control at one ε
        assert n_stimuli == N_SITES * 2 * 3
        assert db.scalar(select(func.count()).select_from(Presentation)) == 2 * n_stimuli
        targeted = set(db.scalars(select(Stimulus.site_id).where(Stimulus.kind != "clean")))
        assert len(targeted) == N_SITES
        batch = db.scalar(select(Batch))
        assert batch is not None
        manifest = build_manifest(db, session, batch, ContentStore(settings.artifact_dir))
        assert (
            BatchManifest.model_validate(manifest.model_dump()).content_sha256()
            == batch.manifest_sha256
        )
    output = log.read_text()
    assert output.count("launched") >= 2
    # the chunk finished before the kill is not made again; the interrupted one is
    assert output.count(f"session {session_id}: stimuli of chunk 1/2 made") == 1
    assert output.count(f"session {session_id}: stimuli of chunk 2/2 made") == 1
    engine.dispose()
