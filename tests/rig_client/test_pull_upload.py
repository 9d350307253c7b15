"""Pull (verified, resumable) and spool → upload (exactly once) against a contract fake."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from itloop.rig_client.acquisition import FakeSpikeSource
from itloop.rig_client.batch import open_batch, pull_batch
from itloop.rig_client.errors import BatchNotVerified, ServerUnavailable
from itloop.rig_client.hardware import FakeEventOutput, FakeEyeTracker
from itloop.rig_client.presentation import HeadlessPresenter, run_session
from itloop.rig_client.runner import counted_presentations, spool_session
from itloop.rig_client.server_client import RigServerClient
from itloop.rig_client.spool import Spool, chunk_key
from itloop.rig_client.uploader import Backoff, Uploader

from .fake_server import FakeServer, make_manifest


@pytest.fixture
def fake() -> FakeServer:
    manifest, images = make_manifest()
    return FakeServer(manifest, images)


def client_for(fake: FakeServer) -> RigServerClient:
    return RigServerClient("http://rig.test", fake.token, transport=fake.transport())


def test_pull_verifies_and_resumes(fake: FakeServer, tmp_path: Path) -> None:
    fake.cut_images_at = 20
    with client_for(fake) as client:
        with pytest.raises(ServerUnavailable):
            pull_batch(client, 7, tmp_path)
        fake.cut_images_at = None
        report = pull_batch(client, 7, tmp_path)
    assert report.resumed == 1
    assert report.downloaded == 3
    ranges = [r.headers.get("Range") for r in fake.requests if "images" in r.url.path]
    assert "bytes=20-" in ranges
    batch = open_batch(tmp_path, 7)
    assert len(batch.manifest.stimuli) == 3
    with client_for(fake) as client:
        again = pull_batch(client, 7, tmp_path)
    assert again.already_present == 3


def test_pull_refuses_a_corrupt_image_and_run_refuses_the_batch(
    fake: FakeServer, tmp_path: Path
) -> None:
    fake.corrupt_image = next(iter(fake.images))
    with client_for(fake) as client, pytest.raises(BatchNotVerified, match="does not match"):
        pull_batch(client, 7, tmp_path)
    with pytest.raises(BatchNotVerified, match="has not been pulled"):
        open_batch(tmp_path, 7)


def test_open_batch_refuses_a_tampered_file(fake: FakeServer, tmp_path: Path) -> None:
    with client_for(fake) as client:
        pull_batch(client, 7, tmp_path)
    image = next((tmp_path / "session-7" / "images").glob("*.png"))
    image.write_bytes(image.read_bytes() + b"x")
    with pytest.raises(BatchNotVerified, match="hashes to"):
        open_batch(tmp_path, 7)


def test_manifest_hash_is_checked(fake: FakeServer, tmp_path: Path) -> None:
    fake.manifest = fake.manifest.model_copy(update={"subject": "M2"})
    with client_for(fake) as client, pytest.raises(BatchNotVerified, match="manifest_sha256"):
        pull_batch(client, 7, tmp_path)


def spooled(fake: FakeServer, spool: Spool) -> int:
    manifest = fake.manifest
    presenter = HeadlessPresenter(FakeEventOutput(), FakeEyeTracker(), refresh_hz=100)
    log = run_session(manifest, presenter)
    onsets = [round((r.onset_s or 0) * 30_000) for r in log.records]
    recording = FakeSpikeSource(
        30_000,
        {1: [o + 3000 for o in onsets], 2: [o + 100 for o in onsets]},
        onsets,
        [r.event_code for r in log.records],
    ).read()
    return spool_session(spool, manifest, counted_presentations(manifest, log.records, recording))


def test_upload_sends_every_presentation_once(fake: FakeServer, tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.sqlite3") as spool, client_for(fake) as client:
        n = spooled(fake, spool)
        assert n == 6
        assert spooled(fake, spool) == 0  # identical repeat is ignored
        report = Uploader(client, spool, chunk_presentations=4).upload(7)
        assert report.chunks_sent == 2
        status = spool.status(7)
    assert status.empty
    assert status.sent + status.quarantined == status.generated == 6
    assert sorted(fake.stored) == list(range(6))
    assert fake.stored[0]["counts"] == [1, 0]  # 3000 ticks is inside [2100, 5100)


def test_journal_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.sqlite3") as spool:
        assert spool._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_backoff_then_success(fake: FakeServer, tmp_path: Path) -> None:
    slept: list[float] = []
    fake.unavailable = 3
    with Spool(tmp_path / "spool.sqlite3") as spool, client_for(fake) as client:
        spooled(fake, spool)
        report = Uploader(
            client, spool, backoff=Backoff(0.1, 2, 1.0, 5), sleep=slept.append
        ).upload(7)
    assert slept == [0.1, 0.2, 0.4]
    assert report.retries == 3
    assert len(fake.stored) == 6


def test_gives_up_and_keeps_everything(fake: FakeServer, tmp_path: Path) -> None:
    fake.unavailable = 100
    with Spool(tmp_path / "spool.sqlite3") as spool, client_for(fake) as client:
        spooled(fake, spool)
        with pytest.raises(ServerUnavailable, match="gave up"):
            Uploader(client, spool, backoff=Backoff(0.1, 2, 1.0, 3), sleep=lambda _s: None).upload(
                7
            )
        assert spool.status(7).pending + spool.status(7).in_chunks == 6


class Crash(BaseException):
    """The rig process dies (here: while it waits to retry)."""


def crash(_seconds: float) -> None:
    raise Crash


def test_crash_after_the_server_stored_reuses_the_key(fake: FakeServer, tmp_path: Path) -> None:
    """The answer is lost after the server stored the chunk; the rig dies; a new process sends
    the same key and body and gets the stored receipt: nothing is stored twice."""
    fake.store_then_drop = 1
    path = tmp_path / "spool.sqlite3"
    with Spool(path) as spool, client_for(fake) as client:
        spooled(fake, spool)
        with pytest.raises(Crash):
            Uploader(client, spool, sleep=crash).upload(7)
        first_key = spool.next_chunk(7, 500)
    assert first_key is not None
    assert len(fake.stored) == 6
    with Spool(path) as spool, client_for(fake) as client:
        report = Uploader(client, spool).upload(7)
        status = spool.status(7)
    keys = [r.headers["Idempotency-Key"] for r in fake.requests if "uploads" in r.url.path]
    assert keys == [first_key.idempotency_key] * 2
    assert first_key.idempotency_key == chunk_key(7, first_key.body)
    assert report.presentations_sent == 6
    assert status.empty
    assert status.sent == 6


def test_corrupt_record_is_quarantined_and_the_rest_goes(fake: FakeServer, tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with Spool(path) as spool:
        spooled(fake, spool)
    with sqlite3.connect(path) as raw:
        raw.execute(
            "UPDATE records SET body = replace(body, '\"counts\":[', '\"counts\":[9') WHERE seq = 2"
        )
    with Spool(path) as spool, client_for(fake) as client:
        report = Uploader(client, spool).upload(7)
        status = spool.status(7)
    assert [q.seq for q in report.quarantined] == [2]
    assert "corrupt" in report.quarantined[0].reason
    assert sorted(fake.stored) == [0, 1, 3, 4, 5]
    assert status.sent + status.quarantined == status.generated
    assert status.empty


def test_server_refusal_quarantines_the_named_item(fake: FakeServer, tmp_path: Path) -> None:
    fake.reject_seqs = {4}
    with Spool(tmp_path / "spool.sqlite3") as spool, client_for(fake) as client:
        spooled(fake, spool)
        report = Uploader(client, spool).upload(7)
        status = spool.status(7)
    assert [q.seq for q in report.quarantined] == [4]
    assert "seq 4 refused" in report.quarantined[0].reason
    assert sorted(fake.stored) == [0, 1, 2, 3, 5]
    assert (status.sent, status.quarantined, status.generated) == (5, 1, 6)


def test_token_never_in_repr_or_errors(fake: FakeServer) -> None:
    fake.unavailable = 1
    client = client_for(fake)
    assert fake.token not in repr(client)
    with pytest.raises(ServerUnavailable) as info:
        client.manifest(7)
    assert fake.token not in str(info.value)
