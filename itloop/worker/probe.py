"""The probe: a two-step diagnostic job that checks a worker end to end.

Step 1 records, in the audit log, which worker received the job. Step 2 runs for the requested
time, reporting progress, and says which worker finished it. An admin who sees a probe succeed
knows that a worker dequeues from that queue, writes to the database and checkpoints steps;
``fail=True`` checks that a failing step reaches the job's row.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import socket
import time
from typing import Any

from dbos import DBOS

from itloop.protocol.jobs import JobKind, ProbeRequest
from itloop.server.db.tables import AuditEntry
from itloop.worker import runtime
from itloop.worker.workflows import JobRun, job_workflow

__all__ = ["PROBE_RECEIVED", "ProbeFailure", "probe"]

PROBE_RECEIVED = "job.probe.received"
"""Audit action written once per probe by its first step."""

TICK_S = 0.1


class ProbeFailure(RuntimeError):
    """The failure a probe was asked to produce."""


def _worker_identity() -> dict[str, Any]:
    return {
        "executor_id": runtime.current().executor_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at": dt.datetime.now(dt.UTC).isoformat(),
    }


@DBOS.step(name="itloop.probe.receive")
def _receive(job_id: int, workflow_id: str) -> dict[str, Any]:
    identity = _worker_identity()
    with runtime.current().sessions.begin() as db:
        db.add(
            AuditEntry(
                action=PROBE_RECEIVED,
                target_type="job",
                target_id=str(job_id),
                detail={"workflow_id": workflow_id, **identity},
            )
        )
    return identity


@DBOS.step(name="itloop.probe.hold")
def _hold(job_id: int, workflow_id: str, duration_s: float, fail: bool) -> dict[str, Any]:
    job = JobRun(job_id, workflow_id)
    ticks = max(1, math.ceil(duration_s / TICK_S))
    started = time.monotonic()
    for tick in range(ticks):
        job.progress(0.1 + 0.9 * tick / ticks, eta_s=max(0.0, duration_s - tick * TICK_S))
        if fail and tick >= ticks // 2:
            raise ProbeFailure(f"probe {workflow_id} failed on request after {tick} ticks")
        deadline = started + (tick + 1) * duration_s / ticks
        time.sleep(max(0.0, deadline - time.monotonic()))
    return _worker_identity()


@job_workflow(JobKind.probe)
def probe(job: JobRun, payload: dict[str, Any]) -> dict[str, Any]:
    request = ProbeRequest.model_validate(payload)
    received = _receive(job.job_id, job.workflow_id)
    finished = _hold(job.job_id, job.workflow_id, request.duration_s, request.fail)
    return {
        "received_by": received,
        "finished_by": finished,
        "duration_s": request.duration_s,
        "queue": request.queue.value,
    }
