"""Worker entry points: a standalone worker process, and the worker inside ``itloop serve``."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from itloop.server.settings import Settings
from itloop.worker import ranks, runtime
from itloop.worker.schedules import register_schedules

__all__ = ["run_worker", "run_worker_ranks", "start_in_process", "stop_in_process"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10
"""Seconds a stopping worker lets running jobs finish; the rest resume at its next start."""


def _start(settings: Settings, role: runtime.Role) -> None:
    runtime.configure(settings, role=role)
    try:
        runtime.launch()
        register_schedules(settings)
    except BaseException:
        runtime.shutdown(grace_s=0)
        raise


def run_worker(settings: Settings, *, stop_event: threading.Event | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT (or ``stop_event``), then stop gracefully.

    Takes jobs from the ``gpu`` and ``cpu`` queues and, first, resumes the jobs this worker id
    left unfinished (see ``Settings.worker_id``).
    """
    stop = stop_event if stop_event is not None else threading.Event()
    previous: dict[signal.Signals, object] = {}
    if threading.current_thread() is threading.main_thread():

        def _request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("worker stopping on %s", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _request_stop)
    try:
        _start(settings, "worker")
        try:
            while not stop.wait(timeout=1.0):
                pass
        finally:
            runtime.shutdown(grace_s=SHUTDOWN_GRACE_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def run_worker_ranks(settings: Settings, *, stop_event: threading.Event | None = None) -> None:
    """:func:`run_worker`, or under ``torchrun --nproc-per-node N`` one worker over the host's N
    devices: rank 0 runs the worker and the other ranks attack their shards of its generation
    chunks (:mod:`itloop.worker.ranks`) until rank 0 stops."""
    joined = ranks.join(settings.device)
    if joined is not None and joined.rank > 0:
        from itloop.worker.generation import follow_attack

        ranks.follow({"attack": follow_attack})
        return
    try:
        run_worker(settings, stop_event=stop_event)
    finally:
        ranks.release()


def start_in_process(settings: Settings) -> None:
    """Start a worker inside this process (``itloop serve`` on the embedded default)."""
    _start(settings, "serve")


def stop_in_process() -> None:
    """Stop the worker started by ``start_in_process`` (safe to call when none runs)."""
    runtime.shutdown(grace_s=SHUTDOWN_GRACE_S)
