"""A lab with one scheduled session, and the environment of a worker process to generate it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from itloop.server.db.tables import Job, JobState, Protocol, Rig

from ..server.lab_setup import add_subject_with_sites, schedule_every_site
from .test_loop_e2e import PX


def schedule_session(
    sessions: sessionmaker[Session],
    images: Path,
    *,
    name: str,
    sites: int,
    eps_l2: list[float],
    attack_steps: int,
) -> int:
    """A subject with ``sites`` sites on one array, a protocol of 2 images per site with noise
    controls drawn from ``images``, and one session of every site scheduled: its id."""
    with sessions() as db:
        rig = Rig(name="rig")
        protocol = Protocol(
            name=name,
            eps_l2=eps_l2,
            images_per_site=2,
            attack_steps=attack_steps,
            controls=["noise"],
            image_source=str(images),
        )
        db.add_all([rig, protocol])
        db.flush()
        subject, _ = add_subject_with_sites(db, sites)
        session = schedule_every_site(db, subject.id, rig.id, protocol.id)
        db.commit()
        return session.id


def worker_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any ITLOOP_ or DBOS_ variable, plus a worker of the
    tiny model on ``data_dir``'s embedded database, on the CPU unless ``settings`` (ITLOOP_ names)
    say otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ITLOOP_", "DBOS_"))}
    env.update(
        ITLOOP_ENVIRONMENT="test",
        ITLOOP_DATA_DIR=str(data_dir),
        ITLOOP_MODEL_BACKBONE="tiny",
        ITLOOP_MODEL_INPUT_PX=str(PX),
        ITLOOP_DEVICE="cpu",
    )
    env.update(settings)  # ITLOOP_DEVICE among them too
    return env


def wait_for_job(
    sessions: sessionmaker[Session],
    job_id: int,
    worker: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float,
) -> int:
    """Wait until the job has succeeded, while the worker runs; returns the job's attempts.
    Fails with the job's error or the worker's log."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sessions() as db:
            row = db.get(Job, job_id)
            assert row is not None
            if row.state is JobState.succeeded:
                return row.attempts
            assert row.state is not JobState.failed, row.error
        assert worker.poll() is None, log.read_text()[-5000:]
        assert time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.2)
