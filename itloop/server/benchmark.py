"""Ingest benchmark: a 5-hour session's upload through the API on loopback, timed end to end."""

from __future__ import annotations

import datetime as dt
import io
import json
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image as PILImage
from sqlalchemy import func, select

from itloop.server import accounts, migrate
from itloop.server.app import create_app
from itloop.server.artifacts import ContentStore
from itloop.server.batches import NewImage, NewPresentation, NewStimulus, publish_batch
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import (
    ElectrodeArray,
    Protocol,
    RecordingSite,
    Response,
    Rig,
    SessionState,
    StimulusKind,
    Subject,
    TokenKind,
)
from itloop.server.sessions import schedule, transition
from itloop.server.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed(url: str, store: ContentStore, *, presentations: int, sites: int) -> tuple[int, str]:
    """A published session of ``presentations`` planned presentations; returns (id, rig token)."""
    from itloop.server.auth import Principal
    from itloop.server.db.tables import Role

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            subject, rig = Subject(name="bench"), Rig(name="bench-rig")
            protocol = Protocol(name="bench", eps_l2=[1.0])
            db.add_all([subject, rig, protocol])
            db.flush()
            arrays = [
                ElectrodeArray(subject_id=subject.id, name=f"utah{i}", n_channels=96)
                for i in range((sites + 95) // 96)
            ]
            db.add_all(arrays)
            db.flush()
            db.add_all(
                RecordingSite(array_id=arrays[i // 96].id, electrode=i % 96, acq_channel=i + 1)
                for i in range(sites)
            )
            db.flush()
            actor = Principal(kind=TokenKind.user, user_id=None, role=Role.admin)
            session = schedule(
                db,
                subject_id=subject.id,
                rig_id=rig.id,
                protocol_id=protocol.id,
                scheduled_for=dt.datetime.now(dt.UTC),
                site_ids=None,
                notes="ingest benchmark",
                actor=actor,
            )
            transition(db, session, SessionState.generating, actor=None)
            n_stimuli = max(1, presentations // 2)
            buf = io.BytesIO()
            PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
            sha = store.put(buf.getvalue())
            stimuli = [NewStimulus(f"s{i}", sha, StimulusKind.clean) for i in range(n_stimuli)]
            plan = [
                NewPresentation(seq, f"s{seq % n_stimuli}", 1 + seq, seq // 8)
                for seq in range(presentations)
            ]
            publish_batch(
                db,
                session,
                images=[NewImage(sha, 8, 8)],
                stimuli=stimuli,
                plan=plan,
                spare_event_codes=[],
                store=store,
            )
            transition(db, session, SessionState.running, actor=None)
            db.commit()
            _, token = accounts.create_token(db, name="bench", kind=TokenKind.rig, rig_id=rig.id)
            return session.id, token
    finally:
        engine.dispose()


def _chunks(
    session_id: int, url: str, *, presentations: int, chunk: int, rng: np.random.Generator
) -> list[tuple[str, bytes]]:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            from itloop.server.db.tables import Presentation, SessionSite

            site_ids = sorted(
                db.scalars(select(SessionSite.site_id).where(SessionSite.session_id == session_id))
            )
            planned = db.execute(
                select(Presentation.seq, Presentation.stimulus_id, Presentation.event_code)
                .where(Presentation.session_id == session_id)
                .order_by(Presentation.seq)
            ).all()
    finally:
        engine.dispose()
    counts = rng.poisson(8, size=(presentations, len(site_ids)))
    out = []
    for start in range(0, presentations, chunk):
        body = {
            "window_start_ms": 70.0,
            "window_end_ms": 170.0,
            "site_ids": site_ids,
            "presentations": [
                {
                    "seq": seq,
                    "stimulus_id": stim,
                    "event_code": code,
                    "onset_ticks": 30_000 + 6_000 * seq,
                    "tick_rate_hz": 30_000,
                    "fixation_ok": True,
                    "frame_drops": 0,
                    "counts": counts[seq].tolist(),
                }
                for seq, stim, code in planned[start : start + chunk]
            ],
        }
        out.append((f"bench-{session_id}-{start:08d}", json.dumps(body).encode()))
    return out


def run_upload_benchmark(
    url: str | None, *, presentations: int, sites: int, chunk: int, workdir: Path
) -> dict[str, Any]:
    """Seed a session, serve it with uvicorn on loopback, upload it in chunks, and time that."""
    url = url or f"sqlite:///{workdir / 'bench.sqlite3'}"
    settings = Settings(environment="test", data_dir=workdir / "data", database_url=url)
    settings.prepare_data_dir()
    migrate.upgrade(url)
    store = ContentStore(settings.artifact_dir)
    session_id, token = _seed(url, store, presentations=presentations, sites=sites)
    bodies = _chunks(
        session_id, url, presentations=presentations, chunk=chunk, rng=np.random.default_rng(0)
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            started = time.perf_counter()
            for key, body in bodies:
                answer = client.post(
                    f"/api/v1/sessions/{session_id}/uploads",
                    content=body,
                    headers={**headers, "Idempotency-Key": key},
                )
                if answer.status_code != 201:
                    raise RuntimeError(f"upload {key} answered {answer.status_code}: {answer.text}")
            elapsed = time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join(30)
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            stored = db.scalar(select(func.sum(Response.n_sites))) or 0
        dialect = engine.dialect.name
    finally:
        engine.dispose()
    expected = presentations * sites
    if stored != expected:
        raise RuntimeError(f"stored {stored} responses, expected {expected}")
    return {
        "database": dialect,
        "presentations": presentations,
        "sites": sites,
        "chunk_presentations": chunk,
        "responses_stored": stored,
        "body_mb": round(sum(len(b) for _, b in bodies) / 1e6, 1),
        "seconds": round(elapsed, 2),
        "responses_per_s": round(stored / elapsed),
    }


def main(
    databases: list[str], *, presentations: int, sites: int, chunk: int
) -> list[dict[str, Any]]:
    """Run the benchmark on each database ('sqlite' or a PostgreSQL admin URL)."""
    results = []
    for target in databases:
        with tempfile.TemporaryDirectory(prefix="itloop-bench-") as tmp:
            workdir = Path(tmp)
            workdir.chmod(0o700)
            if target == "sqlite":
                url = None
                results.append(
                    run_upload_benchmark(
                        url, presentations=presentations, sites=sites, chunk=chunk, workdir=workdir
                    )
                )
                continue
            from sqlalchemy import create_engine, text
            from sqlalchemy.engine import make_url

            name = f"itloop_bench_{secrets.token_hex(6)}"
            admin = create_engine(target, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                url = make_url(target).set(database=name).render_as_string(hide_password=False)
                results.append(
                    run_upload_benchmark(
                        url, presentations=presentations, sites=sites, chunk=chunk, workdir=workdir
                    )
                )
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    return results
