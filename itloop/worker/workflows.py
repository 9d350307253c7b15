"""Job workflows by name: the registry, and the ``Job`` row bookkeeping around every body.

A job body is an ordinary function ``body(job, payload) -> result`` made of DBOS steps; the
wrapper registered with DBOS under ``workflow_name(kind)`` records each attempt, the outcome
and the error in the job's row, so users see the same thing whichever worker ran it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbos import DBOS
from sqlalchemy import update

from itloop.protocol.jobs import JobKind, workflow_name
from itloop.server.db.tables import Job, JobState
from itloop.worker import runtime

__all__ = [
    "MAX_RECOVERY_ATTEMPTS",
    "JobBody",
    "JobRun",
    "implemented_kinds",
    "job_workflow",
    "unregister",
]

MAX_RECOVERY_ATTEMPTS = 10
"""A job interrupted this many times (e.g. killed by the OOM killer each time) is given up."""

_UNFINISHED = (JobState.queued, JobState.running)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class JobRun:
    """What a job body knows about its job: ids, and a way to report progress."""

    job_id: int
    workflow_id: str

    def progress(self, fraction: float, *, eta_s: float | None = None) -> None:
        """Record ``fraction`` (0..1) done and ``eta_s`` seconds left in the job's row.

        Call it from inside steps as often as is useful; it is a plain idempotent write, so a
        step that is re-run after a crash simply reports again.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction {fraction!r} is outside 0..1")
        if eta_s is not None and eta_s < 0:
            raise ValueError(f"eta_s {eta_s!r} is negative")
        with runtime.current().sessions.begin() as db:
            db.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.state == JobState.running)
                .values(progress=fraction, eta_s=eta_s, updated_at=_now())
            )


JobBody = Callable[[JobRun, dict[str, Any]], dict[str, Any]]

_implemented: dict[JobKind, JobBody] = {}


def implemented_kinds() -> frozenset[JobKind]:
    """The job kinds this process can run."""
    return frozenset(_implemented)


def unregister(kind: JobKind) -> None:
    """Forget the implementation of ``kind`` (for tests that register a stand-in)."""
    _implemented.pop(kind, None)


def _begin_attempt(job_id: int) -> None:
    """Mark the job running and count the attempt (not a step: it runs again on recovery)."""
    with runtime.current().sessions.begin() as db:
        db.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(_UNFINISHED))
            .values(state=JobState.running, attempts=Job.attempts + 1, updated_at=_now())
        )
        db.execute(
            update(Job).where(Job.id == job_id, Job.started_at.is_(None)).values(started_at=_now())
        )


@DBOS.step(name="itloop.job.record_success")
def _record_success(job_id: int, result: dict[str, Any]) -> None:
    with runtime.current().sessions.begin() as db:
        db.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(_UNFINISHED))
            .values(
                state=JobState.succeeded,
                progress=1.0,
                eta_s=0.0,
                result=result,
                error=None,
                finished_at=_now(),
                updated_at=_now(),
            )
        )


@DBOS.step(name="itloop.job.record_failure")
def _record_failure(job_id: int, error: str) -> None:
    with runtime.current().sessions.begin() as db:
        db.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(_UNFINISHED))
            .values(
                state=JobState.failed,
                eta_s=None,
                error=error,
                finished_at=_now(),
                updated_at=_now(),
            )
        )


def job_workflow(kind: JobKind) -> Callable[[JobBody], JobBody]:
    """Register ``body`` as the durable workflow that runs jobs of ``kind``.

    The body must be deterministic outside its steps (DBOS replays it on recovery and skips
    the steps that already finished). Registering a second body for one kind is refused.
    """
    kind = JobKind(kind)

    def decorate(body: JobBody) -> JobBody:
        if kind in _implemented and _implemented[kind] is not body:
            raise ValueError(
                f"job kind {kind.value!r} already has a workflow: {_implemented[kind].__qualname__}"
            )

        @DBOS.workflow(name=workflow_name(kind), max_recovery_attempts=MAX_RECOVERY_ATTEMPTS)
        def run_job(job_id: int, payload: dict[str, Any]) -> dict[str, Any]:
            workflow_id = DBOS.workflow_id
            if workflow_id is None:
                raise RuntimeError(f"{workflow_name(kind)} called outside a DBOS workflow")
            _begin_attempt(job_id)
            try:
                result = body(JobRun(job_id, workflow_id), payload)
            except Exception as exc:  # cancellation is a BaseException and passes through
                _record_failure(job_id, f"{type(exc).__name__}: {exc}")
                raise
            _record_success(job_id, result)
            return result

        _implemented[kind] = body
        return body

    return decorate
