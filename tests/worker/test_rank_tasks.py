"""A worker's ranks pass tasks from rank 0 to the others, on CPUs (gloo) and on GPUs (NCCL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from itloop.worker import ranks

from ..stimulus import multirank

WORKER = Path(__file__).with_name("ranks_worker.py")


def _run(tmp_path: Path, backend: str, scenario: str, *, check: bool) -> tuple[str, Any]:
    setting = "cuda" if backend == "nccl" else "cpu"
    argv = [str(WORKER), str(tmp_path), setting, scenario]
    return setting, multirank.run_ranks(3, backend, argv, tmp_path / "logs", 240, check=check)


@pytest.mark.slow
@pytest.mark.parametrize("backend", multirank.BACKENDS)
def test_tasks_reach_every_rank_and_a_rank_not_ready_is_known_to_all(
    tmp_path: Path, backend: str
) -> None:
    setting, ranked = _run(tmp_path, backend, "protocol", check=True)
    first = json.loads((tmp_path / "0.json").read_text())
    # the second task: ranks 1 and 2 were not ready, and rank 0 knew it before any collective
    assert first["votes"] == [[], [1, 2], [], []]
    # the tasks every rank was ready for ran their collectives on the default group
    assert first["sums"] == [6.0, 6.0]
    assert first["device"].startswith(setting)
    for rank in (1, 2):  # a task failed before its collectives and an unknown kind: no harm
        theirs = json.loads((tmp_path / f"{rank}.json").read_text())
        assert theirs["seen"] == [1, 2, 3, 4]
        assert theirs["sums"] == [6.0, 6.0]
        assert theirs["device"].startswith(setting)
    assert "this rank could not prepare the second task" in ranked.output
    assert "no handler for task kind 'unknown'" in ranked.output
    assert "torchrun stops the rest" not in ranked.output


@pytest.mark.slow
@pytest.mark.parametrize("backend", multirank.BACKENDS)
@pytest.mark.parametrize(("scenario", "failing"), [("break-follower", 2), ("break-leader", 0)])
def test_a_rank_failing_after_every_rank_was_ready_exits_instead_of_leaving_the_others_waiting(
    tmp_path: Path, backend: str, scenario: str, failing: int
) -> None:
    """The others are blocked in the task's sum: without the exit they would wait out the
    collective timeout (30 minutes); torchrun stops them once a rank is gone."""
    _, ranked = _run(tmp_path, backend, scenario, check=False)
    output = ranked.output
    assert ranked.status != 0, output[-3000:]
    assert f"exitcode  : {ranks.BROKEN_EXIT_STATUS}" in output or (
        ranked.status == ranks.BROKEN_EXIT_STATUS
    ), output[-3000:]
    assert (
        f"rank {failing} failed task 'probe' after every rank was ready for its collectives"
        in output
    )
    assert ranked.seconds < 150
    assert not (tmp_path / "0.json").exists()  # rank 0 never finished
