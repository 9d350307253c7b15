"""Upload a session's spool in chunks, exactly once, with exponential back-off."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from itloop.rig_client.errors import ServerRejected, ServerUnavailable
from itloop.rig_client.server_client import RigServerClient
from itloop.rig_client.spool import QuarantinedRecord, Spool, SpoolStatus

_ITEM = re.compile(r"^presentations\[(\d+)\]")
DEFAULT_CHUNK_PRESENTATIONS = 500


@dataclass(frozen=True)
class Backoff:
    """Delays ``initial_s · factor**k`` capped at ``max_s``; gives up after ``max_attempts``
    consecutive failures (None: never)."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    max_attempts: int | None = 10

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        attempt = 0
        while self.max_attempts is None or attempt < self.max_attempts:
            yield min(delay, self.max_s)
            delay *= self.factor
            attempt += 1


@dataclass
class UploadReport:
    session_id: int
    chunks_sent: int = 0
    presentations_sent: int = 0
    retries: int = 0
    quarantined: list[QuarantinedRecord] = field(default_factory=list)
    status: SpoolStatus | None = None


class Uploader:
    """Sends every pending record of a session; safe to kill at any point and start again."""

    def __init__(
        self,
        client: RigServerClient,
        spool: Spool,
        *,
        chunk_presentations: int = DEFAULT_CHUNK_PRESENTATIONS,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if chunk_presentations < 1:
            raise ValueError(f"chunk_presentations {chunk_presentations} must be at least 1")
        self.client = client
        self.spool = spool
        self.chunk_presentations = chunk_presentations
        self.backoff = backoff or Backoff()
        self.sleep = sleep
        self.log = log or (lambda _msg: None)

    def upload(self, session_id: int) -> UploadReport:
        """Upload until the spool is empty; raises ``ServerUnavailable`` when back-off gives up
        (everything not acknowledged stays spooled)."""
        report = UploadReport(session_id)
        before = {q.seq for q in self.spool.quarantined(session_id)}
        while True:
            chunk = self.spool.next_chunk(session_id, self.chunk_presentations)
            if chunk is None:
                break
            delays = self.backoff.delays()
            while True:
                self.spool.note_attempt(chunk.chunk_id)
                try:
                    receipt = self.client.upload(session_id, chunk.idempotency_key, chunk.body)
                except ServerUnavailable as exc:
                    delay = next(delays, None)
                    if delay is None:
                        raise ServerUnavailable(
                            f"gave up on chunk {chunk.idempotency_key} after "
                            f"{self.backoff.max_attempts} attempts: {exc}"
                        ) from exc
                    report.retries += 1
                    self.log(f"server unavailable ({exc}); retrying in {delay:.2f} s")
                    self.sleep(delay)
                    continue
                except ServerRejected as exc:
                    match = _ITEM.match(exc.field or "")
                    if exc.status_code != 422 or match is None:
                        raise
                    index = int(match.group(1))
                    self.spool.reject_item(chunk, index, exc.message)
                    self.log(f"server refused item {index} of a chunk: {exc.message}")
                    break
                self.spool.mark_sent(chunk)
                report.chunks_sent += 1
                report.presentations_sent += receipt.n_presentations
                self.log(f"chunk of {receipt.n_presentations} presentations stored")
                break
        report.quarantined = [q for q in self.spool.quarantined(session_id) if q.seq not in before]
        report.status = self.spool.status(session_id)
        return report
