"""Ranks of the task protocol test (CPU or GPU ranks): rank 0 sends tasks, the others follow.

In the tasks every rank is ready for, the ranks also sum their numbers over the default group
(NCCL on GPUs, gloo on CPUs), as a generation chunk's collectives do.
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


def main(out: Path, device_setting: str) -> None:
    joined = ranks.join(device_setting)
    assert joined is not None
    sums: list[float] = []
    if joined.rank > 0:
        seen: list[Any] = []

        def probe(task: dict[str, Any]) -> None:
            seen.append(task["n"])
            ranks.not_ready(task["n"] != 2)  # not ready for the second task
            if task["n"] == 3:
                raise ValueError("this rank fails the third task after the vote")
            if task["n"] in SUMMED:
                sums.append(summed(joined))

        device = str(joined.device)
        ranks.follow({"probe": probe})
        (out / f"{joined.rank}.json").write_text(
            json.dumps({"seen": seen, "sums": sums, "device": device})
        )
        return
    votes = []
    for n in (1, 2, 3):
        with ranks.leading({"kind": "probe", "n": n}):
            votes.append(ranks.not_ready(True))
            if n in SUMMED:
                sums.append(summed(joined))
    with ranks.leading({"kind": "unknown"}):
        pass  # the others log it and wait for the next task
    with ranks.leading({"kind": "probe", "n": 4}):
        votes.append(ranks.not_ready(True))
        sums.append(summed(joined))
    device = str(joined.device)
    ranks.release()
    (out / "0.json").write_text(json.dumps({"votes": votes, "sums": sums, "device": device}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
