"""The job service: idempotent, atomic enqueue; status; cancellation (no worker needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dbos import DBOSClient
from sqlalchemy import func, select

from itloop.protocol.jobs import APPLICATION_NAME, JobKind, JobState, ProbeRequest
from itloop.server.db.tables import Job
from itloop.server.errors import Conflict, InvalidInput
from itloop.server.jobs import DBOS_SCHEMA, JobService, is_dbos_table, migrate_job_store

from .conftest import JobDatabase

pytestmark = pytest.mark.db


@pytest.fixture
def client(job_db: JobDatabase) -> Iterator[DBOSClient]:
    migrate_job_store(job_db.settings.effective_database_url)
    client = DBOSClient(
        system_database_url=job_db.settings.effective_database_url,
        dbos_system_schema=DBOS_SCHEMA,
        application_name=APPLICATION_NAME,
    )
    yield client
    client.destroy()


def _job_rows(job_db: JobDatabase) -> int:
    with job_db.sessions() as db:
        return int(db.scalar(select(func.count()).select_from(Job)) or 0)


def _workflows(client: DBOSClient, workflow_id: str) -> int:
    return len(client.list_workflows(workflow_ids=[workflow_id]))


def test_enqueue_twice_with_one_key_is_one_job_and_one_workflow(
    job_db: JobDatabase, client: DBOSClient
) -> None:
    first = job_db.jobs.enqueue_probe(ProbeRequest(duration_s=1.0), key="once")
    second = job_db.jobs.enqueue_probe(ProbeRequest(duration_s=1.0), key="once")
    other_service = JobService(job_db.settings, job_db.sessions)
    try:
        third = other_service.enqueue(JobKind.probe, {"duration_s": 1.0}, key="once")
    finally:
        other_service.close()

    assert first.id == second.id == third.id
    assert first.workflow_id == "probe-once"
    assert _job_rows(job_db) == 1
    assert _workflows(client, "probe-once") == 1
    status = client.retrieve_workflow("probe-once").get_status()
    assert status.status == "ENQUEUED"
    assert status.name == "itloop.job.probe"
    assert status.queue_name == "gpu"


def test_one_key_with_another_payload_is_a_conflict(
    job_db: JobDatabase, client: DBOSClient
) -> None:
    job_db.jobs.enqueue_probe(ProbeRequest(duration_s=1.0), key="k1")
    with pytest.raises(Conflict, match="probe-k1"):
        job_db.jobs.enqueue_probe(ProbeRequest(duration_s=2.0), key="k1")
    assert _job_rows(job_db) == 1
    assert _workflows(client, "probe-k1") == 1


def test_a_failed_enqueue_leaves_no_job_row(
    job_db: JobDatabase, client: DBOSClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionError("database went away mid-enqueue")

    monkeypatch.setattr(DBOSClient, "enqueue_in_transaction", refuse)
    with pytest.raises(ConnectionError):
        job_db.jobs.enqueue_probe(ProbeRequest(), key="lost")
    monkeypatch.undo()

    assert _job_rows(job_db) == 0
    assert _workflows(client, "probe-lost") == 0
    retried = job_db.jobs.enqueue_probe(ProbeRequest(), key="lost")  # the retry enqueues it
    assert _workflows(client, retried.workflow_id) == 1


def test_bad_keys_and_payloads_are_refused(job_db: JobDatabase) -> None:
    with pytest.raises(InvalidInput, match="'no spaces'"):
        job_db.jobs.enqueue(JobKind.probe, {}, key="no spaces")
    with pytest.raises(ValueError, match="duration_s"):
        job_db.jobs.enqueue(JobKind.probe, {"duration_s": -1})
    assert _job_rows(job_db) == 0


def test_cancel_a_queued_job(job_db: JobDatabase, client: DBOSClient) -> None:
    job = job_db.jobs.enqueue(JobKind.benchmark, {"model": "x"}, key="to-cancel")
    assert job.state == JobState.queued
    cancelled = job_db.jobs.cancel(job.id)
    assert cancelled.state == JobState.cancelled
    assert cancelled.finished_at is not None
    assert client.retrieve_workflow(job.workflow_id).get_status().status == "CANCELLED"
    assert job_db.jobs.get(job.id).state == JobState.cancelled
    assert job_db.jobs.cancel(job.id).state == JobState.cancelled  # again: unchanged


def test_dbos_tables_are_recognised(job_db: JobDatabase, client: DBOSClient) -> None:
    from sqlalchemy import inspect

    inspector = inspect(job_db.engine)
    ours = set(inspector.get_table_names())
    assert not {name for name in ours if is_dbos_table(name)} & set(Job.metadata.tables)
    if job_db.engine.dialect.name == "sqlite":
        assert {"workflow_status", "operation_outputs"} <= ours
        assert {name for name in ours if is_dbos_table(name)} == ours - set(Job.metadata.tables)
    else:
        assert DBOS_SCHEMA in inspector.get_schema_names()
        assert all(is_dbos_table(t, DBOS_SCHEMA) for t in inspector.get_table_names(DBOS_SCHEMA))
        assert ours == set(Job.metadata.tables)
