"""One day of the loop on the CPU: schedule → generate → present → upload → refit → bounds.

A worker process runs the real jobs (tiny backbone, 32×32 images); a synthetic responder with
its own fixed network plays the monkey; everything else goes through the REST API.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from itloop.models import ITModel
from itloop.server import accounts, migrate
from itloop.server.app import create_app
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import Analysis, Role, TokenKind
from itloop.server.exports.trials import load_session
from itloop.server.settings import Settings
from itloop.server.sitequality import RESULT_KEY, site_quality

pytestmark = [pytest.mark.db, pytest.mark.slow]

PX = 32
N_SITES = 4
EPS = [0.5, 2.0]


def image_folder(root: Path, classes: int = 6, per_class: int = 4) -> Path:
    """Procedural textures in ImageNet-style class folders."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            yy, xx = np.mgrid[0:48, 0:48] / 48.0
            phase = rng.uniform(0, 2 * np.pi, 3)
            freq = 1 + c + rng.uniform(0, 2, 3)
            rgb = np.stack(
                [np.sin(2 * np.pi * freq[k] * (xx + yy * k) + phase[k]) for k in range(3)], -1
            )
            pixels = ((rgb * 0.5 + 0.5) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


class Responder:
    """The synthetic monkey: Poisson counts from a fixed network unlike the fitted one."""

    def __init__(self, n_sites: int) -> None:
        self.net = ITModel.build("tiny", n_sites, input_hw=(PX, PX), seed=1234).eval()
        self.rng = np.random.default_rng(7)

    def counts(self, png: bytes) -> list[int]:
        with Image.open(io.BytesIO(png)) as img:
            x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            drive = self.net(x[None])[0]
        rate = 5.0 + 3.0 * torch.tanh(drive / (drive.abs().mean() + 1e-6))
        return self.rng.poisson(rate.clamp(min=0.1).numpy()).tolist()


@pytest.fixture
def loop(db_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    migrate.upgrade(db_url)
    data_dir = tmp_path / "data"
    settings = Settings(environment="test", data_dir=data_dir, database_url=db_url)
    settings.prepare_data_dir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ITLOOP_", "DBOS_"))}
    env.update(
        ITLOOP_ENVIRONMENT="test",
        ITLOOP_DATA_DIR=str(data_dir),
        ITLOOP_DATABASE_URL=db_url,
        ITLOOP_WORKER_ID="e2e-worker",
        ITLOOP_MODEL_BACKBONE="tiny",
        ITLOOP_MODEL_INPUT_PX=str(PX),
        ITLOOP_DEVICE="cpu",
        OMP_NUM_THREADS="2",
    )
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "itloop", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    engine = make_engine(db_url)
    app = create_app(settings, engine=engine)
    try:
        with TestClient(app) as client:
            with make_sessionmaker(engine)() as db:
                staff = accounts.create_user(
                    db, email="staff@lab.test", password="long password!", role=Role.staff
                )
                _, token = accounts.create_token(
                    db, name="staff", kind=TokenKind.user, user_id=staff.id
                )
            yield {
                "client": client,
                "staff": {"Authorization": f"Bearer {token}"},
                "engine": engine,
                "images": image_folder(tmp_path / "images"),
                "worker_log": tmp_path / "worker.log",
                "worker": worker,
            }
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
        engine.dispose()


def _ok(answer: Any, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json()


def _wait(what: str, probe: Any, loop: dict[str, Any], timeout_s: float = 240) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if loop["worker"].poll() is not None:
            pytest.fail(
                f"worker exited while waiting for {what}:\n{loop['worker_log'].read_text()}"
            )
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{loop['worker_log'].read_text()[-4000:]}")


def test_one_day_of_the_loop(loop: dict[str, Any]) -> None:
    client, staff = loop["client"], loop["staff"]
    subject = _ok(client.post("/api/v1/subjects", json={"name": "M1"}, headers=staff), 201)
    array = _ok(
        client.post(
            "/api/v1/arrays", json={"subject_id": subject["id"], "name": "aIT"}, headers=staff
        ),
        201,
    )
    sites = [
        _ok(
            client.post(
                "/api/v1/sites",
                json={"array_id": array["id"], "electrode": i, "acq_channel": i + 1},
                headers=staff,
            ),
            201,
        )["id"]
        for i in range(N_SITES)
    ]
    rig = _ok(client.post("/api/v1/rigs", json={"name": "rig-1"}, headers=staff), 201)
    protocol = _ok(
        client.post(
            "/api/v1/protocols",
            json={
                "name": "e2e",
                "eps_l2": EPS,
                "images_per_site": 3,
                "repeats": 2,
                "attack_steps": 5,
                "images_per_trial": 4,
                "image_source": str(loop["images"]),
            },
            headers=staff,
        ),
        201,
    )
    session = _ok(
        client.post(
            "/api/v1/sessions",
            json={
                "subject_id": subject["id"],
                "rig_id": rig["id"],
                "protocol_id": protocol["id"],
                "scheduled_for": "2026-12-03T09:00:00Z",
            },
            headers=staff,
        ),
        201,
    )
    sid = session["id"]

    def ready() -> Any:
        state = _ok(client.get(f"/api/v1/sessions/{sid}", headers=staff))
        assert state["state"] != "failed", state
        return state if state["state"] == "ready" else None

    ready_state = _wait("generation", ready, loop)
    day0 = ready_state["model_version_id"]
    assert day0 is not None

    with make_sessionmaker(loop["engine"])() as db:
        _, rig_token = accounts.create_token(db, name="rig", kind=TokenKind.rig, rig_id=rig["id"])
    rig_h = {"Authorization": f"Bearer {rig_token}"}
    manifest = _ok(client.get(f"/api/v1/sessions/{sid}/batch/manifest", headers=rig_h))
    kinds = {s["kind"] for s in manifest["stimuli"]}
    assert kinds == {"clean", "attack", "noise", "interpolation"}
    n_clean = sum(s["kind"] == "clean" for s in manifest["stimuli"])
    assert n_clean == 3 * N_SITES
    assert len(manifest["stimuli"]) == n_clean * (1 + 3 * len(EPS))
    assert len(manifest["presentations"]) == 2 * len(manifest["stimuli"])

    images = {}
    for s in manifest["stimuli"]:
        url = f"/api/v1/sessions/{sid}/batch/images/{s['sha256']}"
        images[s["stimulus_id"]] = client.get(url, headers=rig_h).content

    _ok(client.post(f"/api/v1/sessions/{sid}/transitions", json={"to": "running"}, headers=rig_h))
    responder = Responder(N_SITES)
    order = [manifest["sites"].index(s) for s in manifest["sites"]]
    assert order == list(range(N_SITES))
    presentations = [
        {
            "seq": p["seq"],
            "stimulus_id": p["stimulus_id"],
            "event_code": p["event_code"],
            "onset_ticks": 30_000 + 6_000 * p["seq"],
            "tick_rate_hz": 30_000,
            "fixation_ok": True,
            "frame_drops": 0,
            "counts": responder.counts(images[p["stimulus_id"]]),
        }
        for p in manifest["presentations"]
    ]
    site_ids = [s["site_id"] for s in manifest["sites"]]
    for start in range(0, len(presentations), 50):
        body = {
            "window_start_ms": 70.0,
            "window_end_ms": 170.0,
            "site_ids": site_ids,
            "presentations": presentations[start : start + 50],
        }
        answer = client.post(
            f"/api/v1/sessions/{sid}/uploads",
            content=json.dumps(body),
            headers={
                **rig_h,
                "Content-Type": "application/json",
                "Idempotency-Key": f"e2e-{start:06d}",
            },
        )
        assert answer.status_code == 201, answer.text
    _ok(client.post(f"/api/v1/sessions/{sid}/transitions", json={"to": "uploaded"}, headers=rig_h))

    job = _ok(
        client.post(
            "/api/v1/jobs/refit",
            json={"subject_id": subject["id"], "night": "2026-12-03"},
            headers=staff,
        ),
        202,
    )

    def refitted() -> Any:
        status = _ok(client.get(f"/api/v1/jobs/{job['id']}", headers=staff))
        assert status["state"] != "failed", status
        return status if status["state"] == "succeeded" else None

    done = _wait("refit", refitted, loop)
    new_version = done["result"]["model_version_id"]
    assert new_version != day0
    lineage = _ok(client.get(f"/api/v1/model-versions/{new_version}/lineage", headers=staff))
    assert [v["id"] for v in lineage] == [new_version, day0]
    assert lineage[0]["n_trials"] == len(presentations)

    results = _ok(client.get("/api/v1/sensitivity", params={"session_id": sid}, headers=staff))
    attack = {(r["site_id"], r["eps_l2"]) for r in results if r["kind"] == "attack"}
    assert attack == {(s, e) for s in sites for e in EPS}
    assert {r["kind"] for r in results} == {"attack", "noise", "interpolation"}
    for r in results:
        assert r["n_images"] == 3
        assert r["ci_low"] <= r["lower_bound_normalised"] <= r["ci_high"]
        assert r["sigma_clean"] > 0
    final = _ok(client.get(f"/api/v1/sessions/{sid}", headers=staff))
    assert final["state"] == "analysed"
    # The analysis keeps each site's recording quality, which the site pages read.
    with make_sessionmaker(loop["engine"])() as db:
        analysis = db.scalars(select(Analysis).where(Analysis.session_id == sid)).one()
        record = analysis.result[RESULT_KEY]
        expected = site_quality(load_session(db, sid), {}, None)
    assert record["usable"] == len(presentations)
    assert set(record["sites"]) == {str(s) for s in sites}
    for q in expected:
        stored = record["sites"][str(q.site_id)]
        assert stored["reliability"] == pytest.approx(q.reliability)
        assert stored["sigma_clean"] == pytest.approx(q.sigma_clean)
        assert stored["n_clean"] == q.n_clean > 0
