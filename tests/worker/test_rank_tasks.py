"""A worker's ranks pass tasks from rank 0 to the others, on CPUs (gloo) and on GPUs (NCCL)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_MULTIRANK = Path(__file__).resolve().parents[1] / "stimulus" / "multirank.py"
_spec = importlib.util.spec_from_file_location("worker_multirank", _MULTIRANK)
assert _spec is not None
assert _spec.loader is not None
multirank = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multirank)

WORKER = Path(__file__).with_name("ranks_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("backend", multirank.BACKENDS)
def test_tasks_reach_every_rank_and_a_rank_not_ready_is_known_to_all(
    tmp_path: Path, backend: str
) -> None:
    setting = "cuda" if backend == "nccl" else "cpu"
    output = multirank.run_ranks(
        3, backend, [str(WORKER), str(tmp_path), setting], tmp_path / "logs", timeout_s=240
    )
    first = json.loads((tmp_path / "0.json").read_text())
    # the second task: ranks 1 and 2 were not ready, and rank 0 knew it before any collective
    assert first["votes"] == [[], [1, 2], [], []]
    # the tasks every rank was ready for ran their collectives on the default group
    assert first["sums"] == [6.0, 6.0]
    assert first["device"].startswith(setting)
    for rank in (1, 2):  # a failed task and an unknown kind do not stop a rank
        theirs = json.loads((tmp_path / f"{rank}.json").read_text())
        assert theirs["seen"] == [1, 2, 3, 4]
        assert theirs["sums"] == [6.0, 6.0]
        assert theirs["device"].startswith(setting)
    assert "this rank fails the third task" in output
    assert "no handler for task kind 'unknown'" in output
