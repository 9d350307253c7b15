"""Fixtures of the rig client's tests: a published session on a real server, an X display."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage


@dataclass
class RigLab:
    session_id: int
    rig_id: int
    site_ids: list[int]
    acq_channels: list[int]
    n_planned: int
    rig_token: str
    other_rig_token: str


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_rig_lab(
    database_url: str,
    artifact_dir: Path,
    *,
    n_sites: int = 3,
    n_images: int = 3,
    repeats: int = 2,
    images_per_trial: int = 4,
) -> RigLab:
    """A subject with sites on channels 1..n, a rig with a token, a published batch."""
    from itloop.server import accounts
    from itloop.server.artifacts import ContentStore
    from itloop.server.batches import NewImage, NewPresentation, NewStimulus, publish_batch
    from itloop.server.db import make_engine, make_sessionmaker
    from itloop.server.db.tables import Protocol, Rig, SessionState, StimulusKind, TokenKind
    from itloop.server.sessions import transition

    from ..server.lab_setup import add_subject_with_sites, schedule_every_site

    engine = make_engine(database_url)
    store = ContentStore(artifact_dir)
    with make_sessionmaker(engine)() as db:
        rig, other = Rig(name="rig-1"), Rig(name="rig-2")
        protocol = Protocol(name="paper", eps_l2=[1.0], images_per_trial=images_per_trial)
        db.add_all([rig, other, protocol])
        db.flush()
        subject, sites = add_subject_with_sites(db, n_sites)
        session = schedule_every_site(db, subject.id, rig.id, protocol.id)
        db.commit()
        transition(db, session, SessionState.generating, actor=None)
        images, stimuli = [], []
        for i in range(n_images):
            sha = store.put(png(100 + i))
            images.append(NewImage(sha, 16, 16))
            stimuli.append(NewStimulus(f"c{i}", sha, StimulusKind.clean))
        keys = [s.key for s in stimuli] * repeats
        plan = [
            NewPresentation(seq, key, 100 + seq, seq // images_per_trial)
            for seq, key in enumerate(keys)
        ]
        publish_batch(
            db,
            session,
            images=images,
            stimuli=stimuli,
            plan=plan,
            spare_event_codes=[900 + i for i in range(16)],
            store=store,
        )
        db.commit()
        _, token = accounts.create_token(db, name="rig", kind=TokenKind.rig, rig_id=rig.id)
        _, other_token = accounts.create_token(
            db, name="rig 2", kind=TokenKind.rig, rig_id=other.id
        )
        lab = RigLab(
            session.id,
            rig.id,
            [s.id for s in sites],
            [s.acq_channel for s in sites],
            len(plan),
            token,
            other_token,
        )
    engine.dispose()
    return lab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def xvfb_display() -> Iterator[str]:
    """An Xvfb server on a free display number; DISPLAY is set for the test."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed")
    for number in range(90, 190):
        if (
            not Path(f"/tmp/.X11-unix/X{number}").exists()
            and not Path(f"/tmp/.X{number}-lock").exists()
        ):
            break
    else:
        pytest.skip("no free X display number")
    proc = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"Xvfb :{number} did not start")
        time.sleep(0.05)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{number}"
    try:
        yield f":{number}"
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
