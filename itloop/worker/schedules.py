"""Cron schedules: the nightly refit, kept in DBOS's schedule table so every worker shares it.

The schedule fires ``nightly_refit``, which enqueues one refit job per subject with recorded
data; a job's key is the subject and the night, so a night fired twice (two workers, a
backfill) still refits each subject once. The schedule is only created where a refit workflow
is registered (``job_workflow(JobKind.refit)``): without one, its jobs would wait forever.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from dbos import DBOS
from dbos._error import DBOSException
from sqlalchemy import select

from itloop.protocol.jobs import JobKind
from itloop.server.db.tables import RecordingSession, SessionState
from itloop.server.settings import Settings
from itloop.worker import runtime
from itloop.worker.workflows import implemented_kinds

__all__ = ["NIGHTLY_REFIT", "nightly_refit", "refit_key", "register_schedules"]

log = logging.getLogger(__name__)

NIGHTLY_REFIT = "itloop-nightly-refit"
"""Name of the nightly refit schedule in DBOS's ``workflow_schedules`` table."""

NIGHTLY_REFIT_WORKFLOW = "itloop.schedule.nightly_refit"

_RECORDED = (SessionState.uploaded, SessionState.analysed)


def refit_key(subject_id: int, night: dt.date) -> str:
    """The job key of one subject's refit for one night."""
    return f"subject-{subject_id}-{night.isoformat()}"


@DBOS.step(name="itloop.schedule.subjects_to_refit")
def _subjects_to_refit() -> list[int]:
    """Subjects with at least one session whose responses were uploaded."""
    with runtime.current().sessions() as db:
        query = (
            select(RecordingSession.subject_id)
            .where(RecordingSession.state.in_(_RECORDED))
            .distinct()
            .order_by(RecordingSession.subject_id)
        )
        return list(db.scalars(query))


@DBOS.step(name="itloop.schedule.enqueue_refit")
def _enqueue_refit(subject_id: int, night: str) -> int:
    job = runtime.current().jobs.enqueue(
        JobKind.refit,
        {"subject_id": subject_id, "night": night},
        key=refit_key(subject_id, dt.date.fromisoformat(night)),
        subject_id=subject_id,
    )
    return job.id


@DBOS.workflow(name=NIGHTLY_REFIT_WORKFLOW)
def nightly_refit(scheduled_at: dt.datetime, context: Any) -> None:
    """Enqueue a refit job for every subject with recorded data (fired by the schedule)."""
    night = scheduled_at.date().isoformat()
    for subject_id in _subjects_to_refit():
        _enqueue_refit(subject_id, night)


def _check(settings: Settings) -> None:
    if not croniter.is_valid(settings.refit_cron):
        raise ValueError(
            f"ITLOOP_REFIT_CRON {settings.refit_cron!r} is not a cron expression "
            "(five fields: minute hour day-of-month month day-of-week)"
        )
    try:
        ZoneInfo(settings.refit_timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"ITLOOP_REFIT_TIMEZONE {settings.refit_timezone!r} is not an IANA time zone"
        ) from exc


def _matches(schedule: Any, settings: Settings) -> bool:
    return bool(
        schedule["workflow_name"] == NIGHTLY_REFIT_WORKFLOW
        and schedule["schedule"] == settings.refit_cron
        and schedule.get("cron_timezone") == settings.refit_timezone
    )


def register_schedules(settings: Settings) -> list[str]:
    """Create or update the nightly refit schedule; return the names of the schedules in force.

    Idempotent: a second call, a restarted worker or a second worker leaves one schedule. A
    changed ``refit_cron``/``refit_timezone`` replaces its definition (DBOS's upsert keeps the
    schedule's id, pause state and last firing). Needs a launched runtime.
    """
    _check(settings)
    if JobKind.refit not in implemented_kinds():
        log.warning(
            "nightly refit not scheduled: this worker registers no %r workflow", JobKind.refit.value
        )
        return []
    existing = DBOS.get_schedule(NIGHTLY_REFIT)
    if existing is not None and _matches(existing, settings):
        return [NIGHTLY_REFIT]
    if existing is None:
        try:
            DBOS.create_schedule(
                schedule_name=NIGHTLY_REFIT,
                workflow_fn=nightly_refit,
                schedule=settings.refit_cron,
                cron_timezone=settings.refit_timezone,
            )
            log.info(
                "scheduled %s at %r (%s)",
                NIGHTLY_REFIT,
                settings.refit_cron,
                settings.refit_timezone,
            )
            return [NIGHTLY_REFIT]
        except DBOSException:
            # Another worker created it between our look and our insert.
            existing = DBOS.get_schedule(NIGHTLY_REFIT)
            if existing is None:
                raise
            if _matches(existing, settings):
                return [NIGHTLY_REFIT]
    DBOS.apply_schedules(
        [
            {
                "schedule_name": NIGHTLY_REFIT,
                "workflow_fn": nightly_refit,
                "schedule": settings.refit_cron,
                "cron_timezone": settings.refit_timezone,
            }
        ]
    )
    log.info("updated %s to %r (%s)", NIGHTLY_REFIT, settings.refit_cron, settings.refit_timezone)
    return [NIGHTLY_REFIT]
