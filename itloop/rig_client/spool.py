"""The rig's local SQLite spool: every counted presentation is on disk before it is uploaded.

WAL journal and ``synchronous=FULL``: a record acknowledged by ``add`` survives a crash or a
power cut. A chunk's body and its idempotency key are written to the spool before the first
attempt to send it, so a retry after a crash sends the very same bytes under the very same key
and the server answers with the stored receipt. ``sent + quarantined + pending == generated``
holds after every transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from itloop.protocol.batches import UploadChunk, UploadedPresentation
from itloop.rig_client.errors import SpoolError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool_sessions (
    session_id INTEGER PRIMARY KEY,
    site_ids TEXT NOT NULL,
    window_start_ms REAL NOT NULL,
    window_end_ms REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    session_id INTEGER NOT NULL REFERENCES spool_sessions(session_id),
    seq INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'quarantined')),
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS records (
    session_id INTEGER NOT NULL REFERENCES spool_sessions(session_id),
    seq INTEGER NOT NULL,
    segment INTEGER,
    onset_ticks INTEGER,
    body TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    chunk_id INTEGER REFERENCES chunks(id),
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id INTEGER NOT NULL REFERENCES spool_sessions(session_id),
    idempotency_key TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL,
    n_presentations INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    body TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS presentation_log (
    session_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX IF NOT EXISTS records_pending ON records (session_id, chunk_id, segment, onset_ticks);
"""


@dataclass(frozen=True)
class SpooledPresentation:
    """A counted presentation and the recording segment its onset ticks belong to."""

    presentation: UploadedPresentation
    segment: int | None = None


@dataclass(frozen=True)
class PendingChunk:
    chunk_id: int
    session_id: int
    idempotency_key: str
    body: bytes
    seqs: tuple[int, ...]


@dataclass(frozen=True)
class QuarantinedRecord:
    session_id: int
    seq: int
    reason: str


@dataclass(frozen=True)
class SpoolStatus:
    session_id: int
    generated: int
    pending: int
    in_chunks: int
    sent: int
    quarantined: int

    @property
    def empty(self) -> bool:
        return self.pending == 0 and self.in_chunks == 0

    def as_dict(self) -> dict[str, int | bool]:
        return {
            "session_id": self.session_id,
            "generated": self.generated,
            "pending": self.pending,
            "in_chunks": self.in_chunks,
            "sent": self.sent,
            "quarantined": self.quarantined,
            "empty": self.empty,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def chunk_key(session_id: int, body: bytes) -> str:
    """The idempotency key of a chunk: a function of its session and exact bytes."""
    return f"itloop-rig-s{session_id}-{_sha(body)[:40]}"


class Spool:
    """A spool file; open one per process, use from one thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise SpoolError(
                    f"{self.path} has spool schema {version}, expected {SCHEMA_VERSION}"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise SpoolError(f"{self.path} is not a usable spool: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def begin_session(
        self, session_id: int, site_ids: Sequence[int], window_start_ms: float, window_end_ms: float
    ) -> None:
        """Record the session's site order and window; a second call must agree."""
        sites = json.dumps([int(s) for s in site_ids])
        with self._tx() as db:
            row = db.execute(
                "SELECT site_ids, window_start_ms, window_end_ms FROM spool_sessions "
                "WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO spool_sessions (session_id, site_ids, window_start_ms, "
                    "window_end_ms) VALUES (?, ?, ?, ?)",
                    (session_id, sites, window_start_ms, window_end_ms),
                )
            elif tuple(row) != (sites, window_start_ms, window_end_ms):
                raise SpoolError(
                    f"session {session_id} is spooled with sites {row[0][:80]} and window "
                    f"[{row[1]}, {row[2]}) ms, not {sites[:80]} and [{window_start_ms}, "
                    f"{window_end_ms}) ms"
                )

    def add(self, session_id: int, items: Sequence[SpooledPresentation]) -> int:
        """Spool ``items`` in one transaction; an identical repeat is ignored. Returns how many
        were new."""
        new = 0
        with self._tx() as db:
            if (
                db.execute(
                    "SELECT 1 FROM spool_sessions WHERE session_id = ?", (session_id,)
                ).fetchone()
                is None
            ):
                raise SpoolError(f"session {session_id} was not begun in the spool")
            for item in items:
                p = item.presentation
                body = p.model_dump_json()
                known = db.execute(
                    "SELECT sha256, state FROM ledger WHERE session_id = ? AND seq = ?",
                    (session_id, p.seq),
                ).fetchone()
                if known is not None:
                    if known[0] != _sha(body):
                        raise SpoolError(
                            f"session {session_id} seq {p.seq} is already spooled ({known[1]}) "
                            "with other content"
                        )
                    continue
                db.execute(
                    "INSERT INTO ledger (session_id, seq, sha256, state) "
                    "VALUES (?, ?, ?, 'pending')",
                    (session_id, p.seq, _sha(body)),
                )
                db.execute(
                    "INSERT INTO records (session_id, seq, segment, onset_ticks, body, sha256) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (session_id, p.seq, item.segment, p.onset_ticks, body, _sha(body)),
                )
                new += 1
        return new

    def next_chunk(self, session_id: int, max_presentations: int) -> PendingChunk | None:
        """The oldest unsent chunk, or a new one from pending records (corrupt ones are
        quarantined on the way); None when nothing is left."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id, idempotency_key, body FROM chunks WHERE session_id = ? "
                "ORDER BY id LIMIT 1",
                (session_id,),
            ).fetchone()
            if row is not None:
                seqs = tuple(
                    r[0]
                    for r in db.execute(
                        "SELECT seq FROM records WHERE chunk_id = ? ORDER BY seq", (row[0],)
                    )
                )
                return PendingChunk(row[0], session_id, row[1], bytes(row[2]), seqs)
            meta = db.execute(
                "SELECT site_ids, window_start_ms, window_end_ms FROM spool_sessions "
                "WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if meta is None:
                return None
            site_ids = json.loads(meta[0])
            rows = db.execute(
                "SELECT seq, segment, onset_ticks, body, sha256 FROM records "
                "WHERE session_id = ? AND chunk_id IS NULL "
                "ORDER BY segment IS NULL, segment, onset_ticks IS NULL, onset_ticks, seq",
                (session_id,),
            ).fetchall()
            chosen: list[tuple[int, UploadedPresentation]] = []
            segment: int | None = None
            last_onset: int | None = None
            for seq, seg, _onset, body, digest in rows:
                presentation, reason = _parse(body, digest, len(site_ids))
                if presentation is None or presentation.seq != seq:
                    self._quarantine(db, session_id, seq, reason or "seq does not match", body)
                    continue
                onset = presentation.onset_ticks
                if onset is not None:
                    if chosen and segment is not None and seg != segment:
                        continue
                    if last_onset is not None and onset <= last_onset:
                        continue
                    segment, last_onset = seg, onset
                chosen.append((seq, presentation))
                if len(chosen) >= max_presentations:
                    break
            if not chosen:
                return None
            chunk = UploadChunk(
                window_start_ms=meta[1],
                window_end_ms=meta[2],
                site_ids=site_ids,
                presentations=[p for _s, p in chosen],
            )
            body_bytes = chunk.model_dump_json().encode()
            key = chunk_key(session_id, body_bytes)
            cur = db.execute(
                "INSERT INTO chunks (session_id, idempotency_key, body, n_presentations, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (session_id, key, body_bytes, len(chosen), _now()),
            )
            chunk_id = int(cur.lastrowid or 0)
            db.executemany(
                "UPDATE records SET chunk_id = ? WHERE session_id = ? AND seq = ?",
                [(chunk_id, session_id, seq) for seq, _p in chosen],
            )
            return PendingChunk(chunk_id, session_id, key, body_bytes, tuple(s for s, _ in chosen))

    def note_attempt(self, chunk_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE chunks SET attempts = attempts + 1 WHERE id = ?", (chunk_id,))

    def mark_sent(self, chunk: PendingChunk) -> None:
        """The server stored ``chunk``: drop its records and count them as sent."""
        with self._tx() as db:
            db.execute(
                "UPDATE ledger SET state = 'sent' WHERE session_id = ? AND seq IN "
                "(SELECT seq FROM records WHERE chunk_id = ?)",
                (chunk.session_id, chunk.chunk_id),
            )
            db.execute("DELETE FROM records WHERE chunk_id = ?", (chunk.chunk_id,))
            db.execute("DELETE FROM chunks WHERE id = ?", (chunk.chunk_id,))

    def reject_item(self, chunk: PendingChunk, index: int, reason: str) -> None:
        """The server refused item ``index`` of ``chunk``: quarantine it, free the rest."""
        with self._tx() as db:
            if not 0 <= index < len(chunk.seqs):
                raise SpoolError(f"chunk {chunk.chunk_id} has no item {index}")
            order = [p.seq for p in UploadChunk.model_validate_json(chunk.body).presentations]
            seq = order[index]
            body = db.execute(
                "SELECT body FROM records WHERE session_id = ? AND seq = ?",
                (chunk.session_id, seq),
            ).fetchone()[0]
            db.execute("UPDATE records SET chunk_id = NULL WHERE chunk_id = ?", (chunk.chunk_id,))
            db.execute("DELETE FROM chunks WHERE id = ?", (chunk.chunk_id,))
            self._quarantine(db, chunk.session_id, seq, reason, body)

    def _quarantine(
        self, db: sqlite3.Connection, session_id: int, seq: int, reason: str, body: str
    ) -> None:
        db.execute(
            "INSERT INTO quarantine (session_id, seq, reason, body, at) VALUES (?, ?, ?, ?, ?)",
            (session_id, seq, reason[:500], body, _now()),
        )
        db.execute("DELETE FROM records WHERE session_id = ? AND seq = ?", (session_id, seq))
        db.execute(
            "UPDATE ledger SET state = 'quarantined' WHERE session_id = ? AND seq = ?",
            (session_id, seq),
        )

    def quarantined(self, session_id: int) -> list[QuarantinedRecord]:
        return [
            QuarantinedRecord(session_id, seq, reason)
            for seq, reason in self._db.execute(
                "SELECT seq, reason FROM quarantine WHERE session_id = ? ORDER BY id", (session_id,)
            )
        ]

    def status(self, session_id: int) -> SpoolStatus:
        generated, sent, quarantined = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(state = 'sent'), 0), "
            "COALESCE(SUM(state = 'quarantined'), 0) FROM ledger WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        pending, in_chunks = self._db.execute(
            "SELECT COALESCE(SUM(chunk_id IS NULL), 0), COALESCE(SUM(chunk_id IS NOT NULL), 0) "
            "FROM records WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        return SpoolStatus(
            session_id, int(generated), int(pending), int(in_chunks), int(sent), int(quarantined)
        )

    def sessions(self) -> list[int]:
        return [r[0] for r in self._db.execute("SELECT session_id FROM spool_sessions ORDER BY 1")]

    def log_presentations(self, session_id: int, records: Sequence[tuple[int, str]]) -> None:
        """Keep the presenter's log (``(seq, json)``) so counting can run later."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO presentation_log (session_id, seq, body) VALUES (?, ?, ?)",
                [(session_id, seq, body) for seq, body in records],
            )

    def presentation_log(self, session_id: int) -> list[str]:
        return [
            body
            for (body,) in self._db.execute(
                "SELECT body FROM presentation_log WHERE session_id = ? ORDER BY seq",
                (session_id,),
            )
        ]


def _parse(body: str, digest: str, n_sites: int) -> tuple[UploadedPresentation | None, str | None]:
    if _sha(body) != digest:
        return None, f"record body does not match its sha256 {digest[:16]}… (corrupt on disk)"
    try:
        presentation = UploadedPresentation.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return None, f"record does not parse: {where}: {first['msg']}"
    if presentation.counts and len(presentation.counts) != n_sites:
        return None, f"{len(presentation.counts)} counts for {n_sites} sites"
    return presentation, None


__all__ = [
    "PendingChunk",
    "QuarantinedRecord",
    "Spool",
    "SpoolStatus",
    "SpooledPresentation",
    "chunk_key",
]
