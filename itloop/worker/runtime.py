"""The worker's DBOS runtime: configuration from ``Settings``, launch, queues and shutdown.

DBOS is a process-global singleton, so this module keeps one runtime per process: the DBOS
instance, the application database the workflows write ``Job`` rows to, and a job service for
workflows that enqueue further jobs.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Literal

from dbos import DBOS, DBOSConfig
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from itloop import __version__
from itloop.protocol.jobs import APPLICATION_NAME, QueueName
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.jobs import DBOS_SCHEMA, JobService
from itloop.server.settings import Settings

__all__ = [
    "CPU_WORKER_CONCURRENCY",
    "Role",
    "WorkerRuntime",
    "application_version",
    "configure",
    "current",
    "executor_id",
    "launch",
    "shutdown",
]

log = logging.getLogger(__name__)

Role = Literal["worker", "serve"]

CPU_WORKER_CONCURRENCY = 4
"""Jobs of the ``cpu`` queue one executor runs at once (the ``gpu`` queue's comes from Settings)."""


class RuntimeStateError(RuntimeError):
    """The runtime was used out of order (not configured, configured twice, ...)."""


@dataclass
class WorkerRuntime:
    settings: Settings
    executor_id: str
    engine: Engine
    sessions: sessionmaker[Session]
    jobs: JobService
    launched: bool = False


_runtime: WorkerRuntime | None = None


def executor_id(settings: Settings, role: Role = "worker") -> str:
    """The DBOS executor id: stable across restarts, so a restarted worker recovers its jobs.

    DBOS recovers the unfinished workflows of the executor id it starts with; two live workers
    must therefore never share one (set ``ITLOOP_WORKER_ID`` when a host runs several).
    """
    if settings.worker_id is not None:
        return settings.worker_id
    return f"{socket.gethostname()}-{role}"


def application_version() -> str:
    """One DBOS application version per itloop release, shared by every process of it.

    DBOS's default (a hash of the registered workflows' source) would differ between a server
    and a GPU worker that register different workflows, and only the newest version dequeues.
    """
    return f"itloop-{__version__}"


def current() -> WorkerRuntime:
    """The configured runtime of this process."""
    if _runtime is None:
        raise RuntimeStateError("the worker runtime is not configured; call configure() first")
    return _runtime


def configure(settings: Settings, *, role: Role = "worker") -> WorkerRuntime:
    """Configure DBOS from ``settings`` and register every itloop workflow (before ``launch``).

    The system database is the application database: PostgreSQL keeps DBOS's tables in schema
    ``dbos``, SQLite in the same file.
    """
    global _runtime
    if _runtime is not None:
        raise RuntimeStateError("the worker runtime is already configured in this process")
    # Importing these modules registers their workflows with DBOS.
    from itloop.worker import generation, probe, refit, schedules  # noqa: F401

    url = settings.effective_database_url
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    runtime = WorkerRuntime(
        settings=settings,
        executor_id=executor_id(settings, role),
        engine=engine,
        sessions=sessions,
        jobs=JobService(settings, sessions),
    )
    config: DBOSConfig = {
        "name": APPLICATION_NAME,
        "system_database_url": url,
        "dbos_system_schema": DBOS_SCHEMA,
        "executor_id": runtime.executor_id,
        "application_version": application_version(),
        "run_migrations": True,
    }
    try:
        DBOS(config=config)
    except BaseException:
        engine.dispose()
        raise
    _runtime = runtime
    return runtime


def launch() -> WorkerRuntime:
    """Launch DBOS (recovering this executor's unfinished workflows) and declare the queues."""
    runtime = current()
    if runtime.launched:
        raise RuntimeStateError("the worker runtime is already launched")
    DBOS.launch()
    runtime.launched = True
    DBOS.register_queue(QueueName.gpu.value, worker_concurrency=runtime.settings.worker_concurrency)
    DBOS.register_queue(QueueName.cpu.value, worker_concurrency=CPU_WORKER_CONCURRENCY)
    log.info(
        "worker %s launched (application version %s) on queues %s",
        runtime.executor_id,
        application_version(),
        ", ".join(q.value for q in QueueName),
    )
    return runtime


def shutdown(*, grace_s: int = 10) -> None:
    """Stop DBOS, giving running workflows ``grace_s`` seconds to finish, and release the database.

    Workflows still running afterwards stay pending in the database; this executor id resumes
    them at its next launch.
    """
    global _runtime
    runtime = _runtime
    if runtime is None:
        return
    try:
        DBOS.destroy(workflow_completion_timeout_sec=grace_s)
    finally:
        _runtime = None
        runtime.jobs.close()
        runtime.engine.dispose()
