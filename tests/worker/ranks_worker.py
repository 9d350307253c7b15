"""Ranks of the task protocol tests (CPU or GPU ranks): rank 0 sends tasks, the others follow.

In the tasks every rank is ready for, the ranks also sum their numbers over the default group
(NCCL on GPUs, gloo on CPUs), as a generation chunk's collectives do. ``scenario``:

- ``protocol``: four tasks; the ranks after the first cannot prepare the second (they say so,
  then raise, as a generation chunk does) and an unknown task comes between the third and fourth.
- ``break-follower`` / ``break-leader``: in the first task, the last rank / rank 0 fails after
  every rank said it was ready, while the others sum.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from itloop.worker import ranks

SUMMED = (1, 4)
"""The tasks in which the ranks sum over the default group."""


def summed(joined: ranks.Ranks) -> float:
    """rank + 1 summed over every rank, on this rank's device."""
    t = torch.tensor([joined.rank + 1.0], device=joined.device)
    dist.all_reduce(t)
    return float(t.item())


def follower(out: Path, joined: ranks.Ranks, scenario: str) -> None:
    seen: list[Any] = []
    sums: list[float] = []

    def probe(task: dict[str, Any]) -> None:
        seen.append(task["n"])
        if task["n"] == 2:
            ranks.not_ready(False)
            raise ValueError("this rank could not prepare the second task")
        ranks.not_ready(True)
        if scenario == "break-follower" and joined.rank == joined.size - 1:
            raise RuntimeError("this rank fails after the vote")
        if task["n"] in SUMMED:
            sums.append(summed(joined))

    device = str(joined.device)
    ranks.follow({"probe": probe})
    (out / f"{joined.rank}.json").write_text(
        json.dumps({"seen": seen, "sums": sums, "device": device})
    )


def leader(out: Path, joined: ranks.Ranks, scenario: str) -> None:
    votes = []
    sums: list[float] = []
    tasks = (1, 2, 3) if scenario == "protocol" else (1,)
    for n in tasks:
        with ranks.leading({"kind": "probe", "n": n}):
            votes.append(ranks.not_ready(True))
            if scenario == "break-leader":
                raise RuntimeError("rank 0 fails after the vote")
            if n in SUMMED:
                sums.append(summed(joined))
    if scenario == "protocol":
        with ranks.leading({"kind": "unknown"}):
            pass  # the others log it and wait for the next task
        with ranks.leading({"kind": "probe", "n": 4}):
            votes.append(ranks.not_ready(True))
            sums.append(summed(joined))
    device = str(joined.device)
    ranks.release()
    (out / "0.json").write_text(json.dumps({"votes": votes, "sums": sums, "device": device}))


def main(out: Path, device_setting: str, scenario: str) -> None:
    joined = ranks.join(device_setting)
    assert joined is not None
    if joined.rank > 0:
        follower(out, joined, scenario)
    else:
        leader(out, joined, scenario)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
