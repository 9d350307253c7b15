"""Durable jobs: status and progress, the refit trigger, the worker probe, cancellation."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import Field

from itloop.protocol.common import Id, WireModel
from itloop.protocol.jobs import JobKind, JobState, JobStatus, ProbeRequest
from itloop.server.api.params import PathId
from itloop.server.auth import Admin, DbSession, JobCaller, Writer
from itloop.server.db.tables import Subject
from itloop.server.errors import InvalidInput
from itloop.server.jobs import JobService

router = APIRouter(prefix="/jobs", tags=["jobs"])


class RefitRequest(WireModel):
    subject_id: Id
    night: dt.date | None = Field(default=None, description="default: today (UTC)")
    again: bool = Field(default=False, description="run even if this night's refit exists")
    fit: dict[str, float | int | bool] | None = Field(
        default=None,
        description="fit settings for this refit (FitConfig fields, e.g. freeze_backbone)",
        max_length=32,
    )


def service(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


@router.get("", response_model=list[JobStatus])
def list_jobs(
    request: Request,
    _who: JobCaller,
    kind: JobKind | None = None,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobStatus]:
    return service(request).list(kind=kind, state=state, limit=limit)


@router.get("/{job_id}", response_model=JobStatus)
def get_job(job_id: PathId, request: Request, _who: JobCaller) -> JobStatus:
    return service(request).get(job_id)


@router.post("/{job_id}/cancel", response_model=JobStatus)
def cancel_job(job_id: PathId, request: Request, _who: Writer) -> JobStatus:
    return service(request).cancel(job_id)


@router.post("/refit", response_model=JobStatus, status_code=202)
def trigger_refit(body: RefitRequest, request: Request, db: DbSession, _who: Writer) -> JobStatus:
    """Refit a subject's model now (once per night unless ``again``), then analyse its data."""
    if db.get(Subject, body.subject_id) is None:
        raise InvalidInput(
            f"subject_id {body.subject_id} does not exist",
            field="subject_id",
            value=body.subject_id,
        )
    night = body.night or dt.datetime.now(dt.UTC).date()
    key = f"subject-{body.subject_id}-{night.isoformat()}"
    if body.again:
        key += f"-{uuid.uuid4().hex[:12]}"
    payload: dict[str, object] = {"subject_id": body.subject_id, "night": night.isoformat()}
    if body.fit:
        payload["fit"] = body.fit
    return service(request).enqueue(
        JobKind.refit,
        payload,
        key=key,
        subject_id=body.subject_id,
    )


@router.post("/probe", response_model=JobStatus, status_code=202)
def probe(body: ProbeRequest, request: Request, _who: Admin) -> JobStatus:
    """A two-step diagnostic job that checks a worker end to end."""
    return service(request).enqueue_probe(body)
