"""The rig client against the real itloop app: pull, present, count, spool, upload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from itloop.rig_client.acquisition import FakeSpikeSource
from itloop.rig_client.batch import pull_batch
from itloop.rig_client.errors import ServerRejected
from itloop.rig_client.hardware import FakeEventOutput, FakeEyeTracker
from itloop.rig_client.presentation import HeadlessPresenter, run_session
from itloop.rig_client.runner import counted_presentations, spool_session
from itloop.rig_client.server_client import RigServerClient
from itloop.rig_client.spool import Spool
from itloop.rig_client.uploader import Uploader

from .conftest import RigLab, make_rig_lab

pytestmark = pytest.mark.db


@pytest.fixture
def app_and_lab(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, RigLab, str]]:
    from itloop.server import migrate
    from itloop.server.app import create_app
    from itloop.server.settings import Settings

    migrate.upgrade(db_url)
    settings = Settings(environment="test", data_dir=tmp_path / "server", database_url=db_url)
    settings.prepare_data_dir()
    lab = make_rig_lab(db_url, settings.artifact_dir, n_images=3, repeats=3, images_per_trial=4)
    with TestClient(create_app(settings)) as client:
        yield client, lab, db_url


def rig_client(http: TestClient, token: str) -> RigServerClient:
    return RigServerClient("http://testserver", token, http=http)


def test_full_session_against_the_server(
    app_and_lab: tuple[TestClient, RigLab, str], tmp_path: Path
) -> None:
    from itloop.server.db import make_engine
    from itloop.server.db.tables import Presentation, Response

    http, lab, db_url = app_and_lab
    client = rig_client(http, lab.rig_token)
    batch = pull_batch(client, lab.session_id, tmp_path / "batches").batch
    manifest = batch.manifest
    assert [s.acq_channel for s in manifest.sites] == lab.acq_channels
    client.transition(lab.session_id, "running")
    eye = FakeEyeTracker(breaks={(0, 1)})
    log = run_session(manifest, HeadlessPresenter(FakeEventOutput(), eye, refresh_hz=60))
    shown = [r for r in log.records if r.shown]
    onsets = [round((r.onset_s or 0) * 30_000) for r in shown]
    recording = FakeSpikeSource(
        30_000,
        {c: [o + 2100 + c for o in onsets] for c in lab.acq_channels},
        onsets,
        [r.event_code for r in shown],
    ).read()
    with Spool(tmp_path / "spool.sqlite3") as spool:
        n = spool_session(spool, manifest, counted_presentations(manifest, log.records, recording))
        report = Uploader(client, spool, chunk_presentations=4).upload(lab.session_id)
        status = spool.status(lab.session_id)
    assert n == len(log.records) > lab.n_planned  # re-queued presentations are new seqs
    assert status.empty
    assert status.sent == n
    assert report.quarantined == []
    client.transition(lab.session_id, "uploaded")
    engine = make_engine(db_url)
    with engine.connect() as db:
        uploaded = db.scalar(
            select(func.count())
            .select_from(Presentation)
            .where(Presentation.session_id == lab.session_id, Presentation.uploaded_at.is_not(None))
        )
        responses = db.scalar(select(func.count()).select_from(Response))
        distinct = db.scalar(select(func.count(func.distinct(Response.presentation_id))))
    engine.dispose()
    assert uploaded == n
    assert responses == distinct == sum(1 for r in log.records if r.shown)


def test_another_rig_is_refused(
    app_and_lab: tuple[TestClient, RigLab, str], tmp_path: Path
) -> None:
    http, lab, _ = app_and_lab
    with pytest.raises(ServerRejected) as info:
        pull_batch(rig_client(http, lab.other_rig_token), lab.session_id, tmp_path)
    assert info.value.status_code == 403


def test_same_key_same_body_replays_the_receipt(
    app_and_lab: tuple[TestClient, RigLab, str], tmp_path: Path
) -> None:
    http, lab, _ = app_and_lab
    client = rig_client(http, lab.rig_token)
    manifest = pull_batch(client, lab.session_id, tmp_path).batch.manifest
    client.transition(lab.session_id, "running")
    log = run_session(manifest, HeadlessPresenter(FakeEventOutput(), FakeEyeTracker()))
    onsets = [round((r.onset_s or 0) * 30_000) for r in log.records]
    recording = FakeSpikeSource(
        30_000, {c: [5] for c in lab.acq_channels}, onsets, [r.event_code for r in log.records]
    ).read()
    with Spool(tmp_path / "spool.sqlite3") as spool:
        spool_session(spool, manifest, counted_presentations(manifest, log.records, recording))
        chunk = spool.next_chunk(lab.session_id, 500)
        assert chunk is not None
        first = client.upload(lab.session_id, chunk.idempotency_key, chunk.body)
        again = client.upload(lab.session_id, chunk.idempotency_key, chunk.body)
        assert again == first
        with pytest.raises(ServerRejected) as info:
            client.upload(lab.session_id, chunk.idempotency_key, chunk.body.replace(b"}", b" }", 1))
        assert info.value.status_code == 422
        report = Uploader(client, spool).upload(lab.session_id)
        assert report.chunks_sent == 1  # the stored chunk, acknowledged by its replayed receipt
        assert spool.status(lab.session_id).empty
