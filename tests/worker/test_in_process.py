"""The worker inside ``itloop serve`` (DBOS in this process) and the nightly refit schedule."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from dbos import DBOS
from sqlalchemy import select

from itloop.protocol.jobs import JobKind, JobState, ProbeRequest
from itloop.server.db.tables import Job, Protocol, RecordingSession, Rig, SessionState, Subject
from itloop.worker import runtime, schedules, workflows
from itloop.worker.main import start_in_process, stop_in_process
from itloop.worker.schedules import NIGHTLY_REFIT, refit_key, register_schedules

from .conftest import JobDatabase, wait_until

pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.fixture
def in_process_worker(job_db: JobDatabase) -> Iterator[JobDatabase]:
    start_in_process(job_db.settings)
    try:
        yield job_db
    finally:
        stop_in_process()


def _finished(job_db: JobDatabase, job_id: int) -> Any:
    status = job_db.jobs.get(job_id)
    return status if status.state in {JobState.succeeded, JobState.failed} else None


def test_the_in_process_worker_runs_a_probe(in_process_worker: JobDatabase) -> None:
    job_db = in_process_worker
    job = job_db.jobs.enqueue_probe(ProbeRequest(duration_s=0.2), key="in-process")
    done = wait_until(
        lambda: _finished(job_db, job.id), timeout_s=30, what=lambda: "the in-process probe"
    )
    assert done.state == JobState.succeeded
    assert done.result is not None
    assert done.result["finished_by"]["executor_id"] == job_db.settings.worker_id


def _recorded_subject(job_db: JobDatabase, name: str, state: SessionState) -> int:
    with job_db.sessions.begin() as db:
        subject, rig, protocol = Subject(name=name), Rig(name=f"rig-{name}"), Protocol(name=name)
        db.add_all([subject, rig, protocol])
        db.flush()
        db.add(
            RecordingSession(
                subject_id=subject.id,
                rig_id=rig.id,
                protocol_id=protocol.id,
                scheduled_for=dt.datetime(2026, 1, 5, 9, tzinfo=dt.UTC),
                state=state,
            )
        )
        return subject.id


@pytest.fixture
def scheduler_only(job_db: JobDatabase) -> Iterator[JobDatabase]:
    """DBOS in this process listening to no job queue: schedules fire, jobs stay queued."""
    runtime.configure(job_db.settings, role="serve")
    try:
        DBOS.listen_queues([])
        runtime.launch()
        yield job_db
    finally:
        runtime.shutdown(grace_s=0)


def test_the_refit_schedule_is_registered_once_and_enqueues_per_subject(
    scheduler_only: JobDatabase,
) -> None:
    job_db = scheduler_only
    assert JobKind.refit in workflows.implemented_kinds()
    for _ in range(3):  # e.g. a restart and a second worker
        assert register_schedules(job_db.settings) == [NIGHTLY_REFIT]
    schedules = DBOS.list_schedules(schedule_name_prefix="itloop-")
    assert [s["schedule_name"] for s in schedules] == [NIGHTLY_REFIT]
    assert schedules[0]["schedule"] == job_db.settings.refit_cron
    assert schedules[0]["cron_timezone"] == job_db.settings.refit_timezone
    schedule_id = schedules[0]["schedule_id"]

    recorded = _recorded_subject(job_db, "Ada", SessionState.uploaded)
    _recorded_subject(job_db, "Bea", SessionState.scheduled)  # nothing recorded yet

    for _ in range(2):  # the same night fired twice still refits each subject once
        DBOS.trigger_schedule(NIGHTLY_REFIT).get_result()
    with job_db.sessions() as db:
        jobs = list(db.scalars(select(Job).where(Job.kind == JobKind.refit.value)))
    assert [job.subject_id for job in jobs] == [recorded]
    night = dt.datetime.now(dt.UTC).date()
    assert jobs[0].workflow_id == f"refit-{refit_key(recorded, night)}"
    assert jobs[0].payload == {"subject_id": recorded, "night": night.isoformat()}
    assert job_db.jobs.get(jobs[0].id).state == JobState.queued
    assert job_db.jobs.cancel(jobs[0].id).state == JobState.cancelled

    changed = job_db.settings.model_copy(update={"refit_cron": "30 3 * * *"})
    assert register_schedules(changed) == [NIGHTLY_REFIT]
    (schedule,) = DBOS.list_schedules(schedule_name_prefix="itloop-")
    assert schedule["schedule"] == "30 3 * * *"
    assert schedule["schedule_id"] == schedule_id


def test_without_a_refit_workflow_nothing_is_scheduled(
    scheduler_only: JobDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        schedules,
        "implemented_kinds",
        lambda: frozenset(workflows.implemented_kinds() - {JobKind.refit}),
    )
    assert register_schedules(scheduler_only.settings) == []
    assert DBOS.get_schedule(NIGHTLY_REFIT) is None


def test_a_bad_cron_is_refused_with_its_value(scheduler_only: JobDatabase) -> None:
    bad = scheduler_only.settings.model_copy(update={"refit_cron": "every night"})
    with pytest.raises(ValueError, match="'every night'"):
        register_schedules(bad)
