"""The job service: enqueue, read and cancel durable jobs from the server side.

A job is a ``Job`` row (what users see: kind, state, progress, error) plus a DBOS workflow of
the same id (what makes it durable). DBOS keeps its tables in the application's own database,
so both are written in one transaction: a crash can leave neither or both, never a row whose
workflow never runs. The workflow id is derived from the caller's key, so enqueueing the same
job twice returns the first one.

The server never registers or runs a workflow; it enqueues by workflow name through a
``DBOSClient`` and the worker (``itloop.worker``) registers the functions under those names.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from dbos import DBOS, DBOSClient, EnqueueOptions
from dbos._error import DBOSNonExistentWorkflowError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from itloop.protocol.jobs import (
    APPLICATION_NAME,
    DEFAULT_QUEUE,
    TERMINAL_STATES,
    JobKind,
    JobState,
    JobStatus,
    ProbeRequest,
    QueueName,
    workflow_name,
)
from itloop.server.db.tables import Job
from itloop.server.errors import Conflict, InvalidInput, NotFound
from itloop.server.settings import Settings

__all__ = [
    "DBOS_SCHEMA",
    "DBOS_SQLITE_TABLES",
    "JobService",
    "is_dbos_table",
    "migrate_job_store",
]

DBOS_SCHEMA = "dbos"
"""PostgreSQL schema that holds DBOS's system tables (in the application's database)."""

DBOS_SQLITE_TABLES = frozenset(
    {
        "dbos_migrations",
        "workflow_status",
        "operation_outputs",
        "notifications",
        "workflow_events",
        "workflow_events_history",
        "streams",
        "event_dispatch_kv",
        "workflow_schedules",
        "application_versions",
        "queues",
        "workflow_input",
        "workflow_output",
    }
)
"""DBOS's system tables in a SQLite file, where they share the file (and namespace) with ours."""

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")

_DBOS_TO_STATE = {
    "ENQUEUED": JobState.queued,
    "DELAYED": JobState.queued,
    "PENDING": JobState.running,
    "SUCCESS": JobState.succeeded,
    "ERROR": JobState.failed,
    "MAX_RECOVERY_ATTEMPTS_EXCEEDED": JobState.failed,
    "CANCELLED": JobState.cancelled,
}

_migrated: set[str] = set()
_migrated_lock = threading.Lock()


def is_dbos_table(name: str | None, schema: str | None = None) -> bool:
    """True for a table that DBOS owns: anything in schema ``dbos`` or a DBOS SQLite table.

    For Alembic's ``include_object``/``include_name`` hooks, so that the "no autogenerate diff"
    check ignores DBOS's tables.
    """
    return schema == DBOS_SCHEMA or (name is not None and name in DBOS_SQLITE_TABLES)


def migrate_job_store(database_url: str) -> None:
    """Create or upgrade DBOS's system tables in ``database_url`` (idempotent; once a process).

    PostgreSQL: schema ``dbos`` of the same database. SQLite: tables in the same file.
    """
    with _migrated_lock:
        if database_url in _migrated:
            return
        DBOS.migrate(database_url, schema=DBOS_SCHEMA)
        _migrated.add(database_url)


def _utc_from_ms(epoch_ms: int | None) -> dt.datetime | None:
    return None if epoch_ms is None else dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC)


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return f"{type(error).__name__}: {error}"


class JobService:
    """Enqueue, read and cancel jobs; mirrors DBOS's view of each workflow into its ``Job`` row."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self._settings = settings
        self._sessions = sessions
        self._client_field: DBOSClient | None = None
        self._lock = threading.Lock()

    def _client(self) -> DBOSClient:
        with self._lock:
            if self._client_field is None:
                url = self._settings.effective_database_url
                migrate_job_store(url)
                self._client_field = DBOSClient(
                    system_database_url=url,
                    dbos_system_schema=DBOS_SCHEMA,
                    application_name=APPLICATION_NAME,
                )
            return self._client_field

    def close(self) -> None:
        """Release the DBOS client's connections."""
        with self._lock:
            if self._client_field is not None:
                self._client_field.destroy()
                self._client_field = None

    def __enter__(self) -> JobService:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def enqueue(
        self,
        kind: JobKind,
        payload: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        queue: QueueName | None = None,
        session_id: int | None = None,
        subject_id: int | None = None,
    ) -> JobStatus:
        """Enqueue a job of ``kind``; with ``key``, again with the same key returns the first job.

        The workflow id is ``"{kind}-{key}"`` (a random key if none is given). The ``Job`` row and
        the DBOS workflow are written in one transaction. The same key with a different payload
        is a ``Conflict``.
        """
        kind = JobKind(kind)
        body = dict(payload or {})
        if kind is JobKind.probe:
            body = ProbeRequest.model_validate(body).model_dump(mode="json")
            queue = queue or QueueName(body["queue"])
        if key is not None and not _KEY.fullmatch(key):
            raise InvalidInput(
                f"job key {key!r} must be 1-100 characters of letters, digits and _.:- "
                "starting with a letter or digit",
                field="key",
                value=key,
            )
        workflow_id = f"{kind.value}-{key if key is not None else uuid.uuid4().hex}"
        queue = queue or DEFAULT_QUEUE[kind]
        client = self._client()
        try:
            with self._sessions() as db, db.begin():
                existing = db.scalar(select(Job).where(Job.workflow_id == workflow_id))
                if existing is not None:
                    return self._same_job(existing, kind, body)
                job = Job(
                    kind=kind.value,
                    state=JobState.queued,
                    workflow_id=workflow_id,
                    session_id=session_id,
                    subject_id=subject_id,
                    payload=body,
                    progress=0.0,
                    attempts=0,
                )
                db.add(job)
                db.flush()
                options: EnqueueOptions = {
                    "workflow_name": workflow_name(kind),
                    "queue_name": queue.value,
                    "workflow_id": workflow_id,
                    "application_name": APPLICATION_NAME,
                }
                client.enqueue_in_transaction(db, options, job.id, body)
                status = JobStatus.model_validate(job)
        except IntegrityError:
            # A concurrent enqueue with the same key committed first: that one is the job.
            with self._sessions() as db:
                existing = db.scalar(select(Job).where(Job.workflow_id == workflow_id))
                if existing is None:
                    raise
                return self._same_job(existing, kind, body)
        return status

    @staticmethod
    def _same_job(existing: Job, kind: JobKind, payload: dict[str, Any]) -> JobStatus:
        if existing.kind != kind.value or existing.payload != payload:
            raise Conflict(
                f"job {existing.workflow_id!r} already exists with kind {existing.kind!r} and "
                f"payload {existing.payload!r}; a new job needs a new key",
                field="key",
                value=existing.workflow_id,
            )
        return JobStatus.model_validate(existing)

    def enqueue_probe(self, request: ProbeRequest, *, key: str | None = None) -> JobStatus:
        """Enqueue a probe: a two-step diagnostic job that checks a worker end to end."""
        return self.enqueue(
            JobKind.probe, request.model_dump(mode="json"), key=key, queue=request.queue
        )

    def get(self, job_id: int) -> JobStatus:
        """The job's status, brought up to date with its DBOS workflow."""
        with self._sessions() as db, db.begin():
            job = db.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} does not exist", field="job_id", value=job_id)
            self._sync(job)
            return JobStatus.model_validate(job)

    def get_by_workflow_id(self, workflow_id: str) -> JobStatus:
        with self._sessions() as db:
            job_id = db.scalar(select(Job.id).where(Job.workflow_id == workflow_id))
        if job_id is None:
            raise NotFound(
                f"no job has workflow id {workflow_id!r}", field="workflow_id", value=workflow_id
            )
        return self.get(job_id)

    def list(
        self, *, kind: JobKind | None = None, state: JobState | None = None, limit: int = 100
    ) -> list[JobStatus]:
        """The newest jobs first; unfinished ones are brought up to date with DBOS."""
        if not 1 <= limit <= 1000:
            raise InvalidInput(f"limit {limit} must be 1..1000", field="limit", value=limit)
        with self._sessions() as db, db.begin():
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if kind is not None:
                query = query.where(Job.kind == JobKind(kind).value)
            jobs = list(db.scalars(query))
            for job in jobs:
                if job.state not in TERMINAL_STATES:
                    self._sync(job)
            return [
                JobStatus.model_validate(job)
                for job in jobs
                if state is None or job.state is JobState(state)
            ]

    def cancel(self, job_id: int) -> JobStatus:
        """Cancel a queued or running job; a finished job is left as it is."""
        with self._sessions() as db, db.begin():
            job = db.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} does not exist", field="job_id", value=job_id)
            self._sync(job)
            if job.state not in TERMINAL_STATES:
                self._client().cancel_workflow(job.workflow_id)
                job.state = JobState.cancelled
                job.eta_s = None
                job.finished_at = dt.datetime.now(dt.UTC)
            return JobStatus.model_validate(job)

    def _sync(self, job: Job) -> None:
        """Mirror DBOS's state of the job's workflow into ``job`` (the caller commits).

        The worker writes progress and the outcome itself; this catches what it cannot:
        a job cancelled while queued, or one that exhausted its recovery attempts.
        """
        try:
            wf = self._client().retrieve_workflow(job.workflow_id).get_status()
        except DBOSNonExistentWorkflowError:
            return
        state = _DBOS_TO_STATE.get(wf.status)
        if state is None:
            return
        current = job.state
        if current in TERMINAL_STATES:
            return
        if state is JobState.running and current is JobState.queued:
            job.state = JobState.running
            job.started_at = job.started_at or _utc_from_ms(wf.dequeued_at or wf.updated_at)
        elif state in TERMINAL_STATES:
            job.state = state
            job.finished_at = job.finished_at or _utc_from_ms(wf.completed_at or wf.updated_at)
            job.eta_s = None
            if state is JobState.succeeded:
                job.progress = 1.0
                if isinstance(wf.output, dict):
                    job.result = wf.output
            elif wf.status == "MAX_RECOVERY_ATTEMPTS_EXCEEDED":
                job.error = job.error or (
                    f"interrupted {wf.recovery_attempts} times (worker crashes or kills); "
                    "not retried again"
                )
            elif state is JobState.failed:
                job.error = job.error or _describe(wf.error) or wf.status
