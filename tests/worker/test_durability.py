"""A job survives its worker being killed: a restarted worker finishes it, skipping done steps."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from dbos import DBOSClient
from sqlalchemy import func, select

from itloop.protocol.jobs import APPLICATION_NAME, JobState, ProbeRequest
from itloop.server.db.tables import AuditEntry, Job
from itloop.server.db.tables import JobState as JobStateColumn
from itloop.server.jobs import DBOS_SCHEMA
from itloop.worker.probe import PROBE_RECEIVED

from .conftest import JobDatabase, WorkerProcess, wait_until

pytestmark = [pytest.mark.db, pytest.mark.slow]

STARTUP_S = 60.0
PROBE_S = 3.0


def _receipts(job_db: JobDatabase, job_id: int) -> int:
    with job_db.sessions() as db:
        query = select(func.count()).where(
            AuditEntry.action == PROBE_RECEIVED, AuditEntry.target_id == str(job_id)
        )
        return int(db.scalar(query) or 0)


def _row(job_db: JobDatabase, job_id: int) -> Job:
    with job_db.sessions() as db:
        job: Job | None = db.get(Job, job_id)
        assert job is not None
        return job


def test_sigkill_mid_workflow_resumes_at_the_unfinished_step(
    job_db: JobDatabase, start_worker: Callable[[], WorkerProcess]
) -> None:
    job = job_db.jobs.enqueue_probe(ProbeRequest(duration_s=PROBE_S), key="sigkill")

    first = start_worker()
    # Step 1 has finished (its receipt is written and checkpointed) and step 2 is reporting
    # progress: the worker is in the middle of the second step.
    wait_until(
        lambda: _receipts(job_db, job.id) == 1 and _row(job_db, job.id).progress >= 0.3,
        timeout_s=STARTUP_S,
        what=lambda: f"step 2 of probe {job.workflow_id} to be under way\n{first.log()}",
    )
    killed_at = time.monotonic()
    first.kill()
    interrupted = _row(job_db, job.id)
    assert interrupted.state is JobStateColumn.running
    assert 0.3 <= interrupted.progress < 1.0

    second = start_worker()
    done = wait_until(
        lambda: (s := job_db.jobs.get(job.id)).state in {JobState.succeeded, JobState.failed} and s,
        timeout_s=STARTUP_S + PROBE_S,
        what=lambda: f"probe {job.workflow_id} to finish after the restart\n{second.log()}",
    )
    assert time.monotonic() - killed_at >= PROBE_S  # step 2 ran again, in full

    assert done.state == JobState.succeeded, done.error
    assert done.progress == 1.0
    assert done.attempts == 2
    assert done.error is None
    assert done.finished_at is not None
    assert _receipts(job_db, job.id) == 1  # step 1 ran exactly once
    assert done.result is not None
    assert done.result["received_by"]["pid"] == first.pid  # replayed from its checkpoint
    assert done.result["finished_by"]["pid"] == second.pid

    client = DBOSClient(
        system_database_url=job_db.settings.effective_database_url,
        dbos_system_schema=DBOS_SCHEMA,
        application_name=APPLICATION_NAME,
    )
    try:
        # The row is final after the last step; DBOS marks the workflow a moment later.
        wait_until(
            lambda: client.retrieve_workflow(job.workflow_id).get_status().status == "SUCCESS",
            timeout_s=10,
            what=lambda: f"DBOS to record {job.workflow_id} as SUCCESS",
        )
        steps = [step["function_name"] for step in client.list_workflow_steps(job.workflow_id)]
    finally:
        client.destroy()
    assert steps.count("itloop.probe.receive") == 1
    assert steps.count("itloop.probe.hold") == 1
    assert second.stop() == 0


def test_a_failing_step_records_the_error_on_the_job(
    job_db: JobDatabase, start_worker: Callable[[], WorkerProcess]
) -> None:
    job = job_db.jobs.enqueue_probe(ProbeRequest(duration_s=0.2, fail=True), key="fails")
    worker = start_worker()
    done = wait_until(
        lambda: (s := job_db.jobs.get(job.id)).state in {JobState.succeeded, JobState.failed} and s,
        timeout_s=STARTUP_S,
        what=lambda: f"probe {job.workflow_id} to fail\n{worker.log()}",
    )
    assert done.state == JobState.failed
    assert done.error is not None
    assert done.error.startswith(f"ProbeFailure: probe {job.workflow_id} failed on request")
    assert done.finished_at is not None
    assert done.result is None
    assert done.attempts == 1
    assert worker.stop() == 0
