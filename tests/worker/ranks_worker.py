"""Ranks of the task protocol test, launched by torchrun: rank 0 sends tasks, the others follow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from itloop.worker import ranks


def main(out: Path) -> None:
    joined = ranks.join("cpu")
    assert joined is not None
    if joined.rank > 0:
        seen: list[Any] = []

        def probe(task: dict[str, Any]) -> None:
            seen.append(task["n"])
            ranks.not_ready(task["n"] != 2)  # not ready for the second task
            if task["n"] == 3:
                raise ValueError("this rank fails the third task after the vote")

        ranks.follow({"probe": probe})
        (out / f"{joined.rank}.json").write_text(json.dumps(seen))
        return
    votes = []
    for n in (1, 2, 3):
        with ranks.leading({"kind": "probe", "n": n}):
            votes.append(ranks.not_ready(True))
    with ranks.leading({"kind": "unknown"}):
        pass  # the others log it and wait for the next task
    with ranks.leading({"kind": "probe", "n": 4}):
        votes.append(ranks.not_ready(True))
    ranks.release()
    (out / "0.json").write_text(json.dumps(votes))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
