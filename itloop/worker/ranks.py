"""One worker over every GPU of its host: ``torchrun --nproc-per-node N -m itloop worker``.

Rank 0 is the worker proper: it takes jobs from the queues, runs the schedules and writes the
database. The other ranks take no jobs. Each holds one device (``cuda:LOCAL_RANK``, or the CPU)
and waits for rank 0's tasks: a generation chunk is sent to every rank, each attacks its
contiguous shard of the chunk's rows and stores its own stimuli in the shared content store, and
rank 0 gets every kept row (:func:`itloop.stimulus.pipeline.attack_and_store`). Without torchrun a
worker is one process on one device.

Tasks travel over a gloo group that waits as long as the worker idles; a task's own collectives use
the default group (NCCL on GPUs, gloo on CPUs) with :data:`COLLECTIVE_TIMEOUT`. Before its
collectives a task lets every rank say whether it is ready (:func:`not_ready`), so a rank that
failed to prepare (a model that did not load) fails the task on every rank instead of leaving the
others waiting. Once every rank has said it is ready, the others count on each rank for the task's
collectives: a rank whose part of the task fails after that point exits at once
(:data:`BROKEN_EXIT_STATUS`) rather than leave the others waiting out the collective timeout, and
torchrun, seeing one of its ranks gone, stops the rest. The job resumes at its last finished step
when the worker starts again, as after any crash.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

__all__ = [
    "BROKEN_EXIT_STATUS",
    "COLLECTIVE_TIMEOUT",
    "Ranks",
    "current",
    "follow",
    "join",
    "leading",
    "not_ready",
    "release",
    "under_torchrun",
]

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
"""How long a task's collective waits for the other ranks (a chunk takes well under a minute on
GPUs)."""

BROKEN_EXIT_STATUS = 70
"""A rank's exit status when its part of a task failed after every rank was ready for the task's
collectives (EX_SOFTWARE): the other ranks cannot finish the task, and torchrun stops them."""

_IDLE_TIMEOUT = timedelta(days=365)
"""How long the other ranks wait for rank 0's next task: as long as the worker runs."""

Task = dict[str, Any]
"""A task for every rank: ``kind`` names its handler; the rest is plain data (pickled)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the worker's ranks."""

    rank: int
    size: int
    device: torch.device
    tasks: dist.ProcessGroup


_ranks: Ranks | None = None
_lead = threading.Lock()  # rank 0 runs one task at a time, whatever the queue's concurrency
_committed = False  # every rank said it was ready for the running task's collectives


def under_torchrun() -> bool:
    """Whether this process is one of several torchrun ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device_setting: str) -> Ranks | None:
    """Join the worker's ranks when started by torchrun with more than one (None otherwise).

    device_setting: ``Settings.device``; 'auto' or 'cuda' give each rank ``cuda:LOCAL_RANK``,
    'cpu' gives CPU ranks (gloo). A setting that names one device is refused.
    """
    global _ranks
    if _ranks is not None or not under_torchrun():
        return _ranks
    local = int(os.environ["LOCAL_RANK"])
    if device_setting == "auto":
        cuda = torch.cuda.is_available()
    elif device_setting in ("cuda", "cpu"):
        cuda = device_setting == "cuda"
    else:
        raise ValueError(
            f"ITLOOP_DEVICE={device_setting!r} names one device, but a worker under torchrun "
            "takes one device per rank: set 'auto', 'cuda' or 'cpu'"
        )
    if cuda:
        gpus = torch.cuda.device_count()
        if local >= gpus:
            raise RuntimeError(f"local rank {local} has no GPU of its own: this host has {gpus}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if cuda else None,
    )
    tasks = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    if not isinstance(tasks, dist.ProcessGroup):  # every rank is in it
        raise RuntimeError("the task group left out this rank")
    _ranks = Ranks(dist.get_rank(), dist.get_world_size(), device, tasks)
    log.info("rank %d of %d on %s (process %d)", _ranks.rank, _ranks.size, device, os.getpid())
    return _ranks


def current() -> Ranks | None:
    """This process's ranks, or None when the worker is one process."""
    return _ranks


@contextmanager
def leading(task: Task) -> Iterator[None]:
    """On rank 0: send ``task`` to the other ranks, which then run it alongside the block (whose
    collectives use the default group). Tasks run one at a time. Without ranks: just the block."""
    if _ranks is None:
        yield
        return
    with _lead:
        dist.broadcast_object_list([task], src=0, group=_ranks.tasks)
        try:
            yield
        except BaseException:
            if _committed:
                _break_ranks(task)
            raise
        finally:
            _commit(False)


def not_ready(ready: bool) -> list[int]:
    """Every rank says whether it is ready for a task's collectives; returns the ranks that are
    not (the same list on every rank). Empty without ranks."""
    if _ranks is None:
        return []
    flag = torch.tensor([1 if ready else 0], dtype=torch.int64)
    votes = [torch.zeros_like(flag) for _ in range(_ranks.size)]
    dist.all_gather(votes, flag, group=_ranks.tasks)
    failed = [r for r, v in enumerate(votes) if not int(v)]
    _commit(not failed)
    return failed


def _commit(committed: bool) -> None:
    global _committed
    _committed = committed


def _break_ranks(task: Task) -> NoReturn:
    """Exit this rank: its part of ``task`` failed after every rank was ready for the task's
    collectives, so the others would wait for it until the collective timeout."""
    rank = -1 if _ranks is None else _ranks.rank
    log.critical(
        "rank %d failed task %r after every rank was ready for its collectives: the other ranks "
        "cannot finish it; this rank exits (status %d) and torchrun stops the rest",
        rank,
        task.get("kind"),
        BROKEN_EXIT_STATUS,
        exc_info=True,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    # not sys.exit: exit handlers would tear the process group down, which waits on the
    # collectives the others are blocked in
    os._exit(BROKEN_EXIT_STATUS)


def follow(handlers: Mapping[str, Callable[[Task], None]]) -> None:
    """On the other ranks: run each task rank 0 sends with the handler its ``kind`` names, until
    rank 0 sends the end (:func:`release`) or is gone. SIGTERM and SIGINT are left to rank 0,
    which stops the others once its running jobs are done."""
    if _ranks is None or _ranks.rank == 0:
        raise RuntimeError("follow() runs on the ranks after the first")
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    try:
        while True:
            box: list[Task | None] = [None]
            dist.broadcast_object_list(box, src=0, group=_ranks.tasks)
            task = box[0]
            if task is None:
                log.info("rank %d: end of work", _ranks.rank)
                break
            handler = handlers.get(str(task.get("kind")))
            try:
                if handler is None:
                    raise ValueError(f"no handler for task kind {task.get('kind')!r}")
                handler(task)
            except Exception:
                if _committed:
                    _break_ranks(task)
                # before its collectives rank 0 fails the same task (not_ready()): the job's
                # error is recorded there; this rank waits for the next task
                log.exception("rank %d: task %r failed", _ranks.rank, task.get("kind"))
            finally:
                _commit(False)
    finally:
        _leave()


def release() -> None:
    """On rank 0 at shutdown: tell the other ranks to stop, then leave the group."""
    if _ranks is None:
        return
    with _lead:
        try:
            dist.broadcast_object_list([None], src=0, group=_ranks.tasks)
        except Exception:  # the others are gone already (killed with torchrun)
            log.warning("the other ranks did not take the end of work", exc_info=True)
        _leave()


def _leave() -> None:
    global _ranks
    if dist.is_initialized():
        dist.destroy_process_group()
    _ranks = None
