"""Durable jobs on the wire: kinds, queues, states and the status a client reads.

Shared by the server (which enqueues jobs by workflow name) and the worker (which registers
the workflows under the same names), so neither imports the other.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from pydantic import Field

from itloop.protocol.common import Id, WireModel

WORKFLOW_PREFIX = "itloop.job."
"""Every job workflow is registered with DBOS as ``WORKFLOW_PREFIX + kind``."""

APPLICATION_NAME = "itloop"
"""The DBOS application name of every itloop process (server, worker, client)."""


class JobKind(StrEnum):
    generate = "generate"
    refit = "refit"
    benchmark = "benchmark"
    probe = "probe"


class QueueName(StrEnum):
    gpu = "gpu"
    cpu = "cpu"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

DEFAULT_QUEUE: dict[JobKind, QueueName] = {
    JobKind.generate: QueueName.gpu,
    JobKind.refit: QueueName.gpu,
    JobKind.benchmark: QueueName.gpu,
    JobKind.probe: QueueName.gpu,
}
"""The queue a job of each kind goes to unless the caller names one."""


def workflow_name(kind: JobKind) -> str:
    """The DBOS workflow name under which the worker registers jobs of ``kind``."""
    return WORKFLOW_PREFIX + kind.value


class ProbeRequest(WireModel):
    """Payload of a probe: a two-step diagnostic job that checks a worker end to end."""

    duration_s: float = Field(
        default=2.0, ge=0.0, le=3600.0, description="how long the second step runs"
    )
    fail: bool = Field(
        default=False, description="make the second step fail, to check error reporting"
    )
    queue: QueueName = QueueName.gpu


class JobStatus(WireModel):
    """A job as clients see it: what it is, where it stands, and how it ended."""

    id: Id
    kind: JobKind
    state: JobState
    workflow_id: str
    session_id: int | None = None
    subject_id: int | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    progress: float = Field(ge=0.0, le=1.0, description="fraction done, 0..1")
    eta_s: float | None = Field(default=None, description="estimated seconds left")
    attempts: int = Field(ge=0, description="how many times a worker started it")
    error: str | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    updated_at: dt.datetime
