"""Fixtures for job tests: an application database, a job service, and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from itloop.server.db import Base, make_engine, make_sessionmaker
from itloop.server.jobs import JobService
from itloop.server.settings import Settings

T = TypeVar("T")

WORKER_ID = "test-worker"


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    what: Callable[[], str],
    interval_s: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something truthy; after the timeout, fail with ``what()``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what()}")
        time.sleep(interval_s)


@dataclass
class JobDatabase:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    jobs: JobService
    log_dir: Path


@pytest.fixture
def job_db(db_url: str, tmp_path: Path) -> Iterator[JobDatabase]:
    """A fresh application database (tables from the ORM) and a job service on it."""
    settings = Settings(
        environment="test", data_dir=tmp_path / "data", database_url=db_url, worker_id=WORKER_ID
    )
    settings.prepare_data_dir()
    engine = make_engine(db_url)
    Base.metadata.create_all(engine)
    jobs = JobService(settings, make_sessionmaker(engine))
    try:
        yield JobDatabase(settings, engine, make_sessionmaker(engine), jobs, tmp_path)
    finally:
        jobs.close()
        engine.dispose()


class WorkerProcess:
    """``python -m itloop.worker`` as a child process, configured by ``ITLOOP_*`` variables."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ITLOOP_", "DBOS_"))}
        env.update(
            ITLOOP_ENVIRONMENT="test",
            ITLOOP_DATA_DIR=str(settings.data_dir),
            ITLOOP_DATABASE_URL=settings.effective_database_url,
            ITLOOP_WORKER_ID=settings.worker_id or WORKER_ID,
        )
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "itloop.worker"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash or the OOM killer."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM and wait for the graceful exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_worker(job_db: JobDatabase) -> Iterator[Callable[[], WorkerProcess]]:
    """Start worker processes on ``job_db``; any still running at the end are stopped."""
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        worker = WorkerProcess(job_db.settings, job_db.log_dir / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.stop()
