"""Sessions, the published batch and the rig's upload through the API, on both databases."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from typing import Any

import pytest

from itloop.protocol.batches import BatchManifest
from itloop.server.db.tables import Presentation, RecordingSession, Response, Role, SessionState
from itloop.server.uploads import unpack_counts

from .conftest import Server, bearer
from .lab_fixture import make_lab

pytestmark = pytest.mark.db


def _chunk(lab: Any, seqs: list[int], *, onset0: int = 30_000, **over: Any) -> dict[str, Any]:
    presentations = []
    for k, seq in enumerate(seqs):
        presentations.append(
            {
                "seq": seq,
                "stimulus_id": lab.stimulus_ids[seq],
                "event_code": 100 + seq,
                "onset_ticks": onset0 + 6000 * k,
                "tick_rate_hz": 30_000,
                "fixation_ok": True,
                "frame_drops": 0,
                "counts": [seq + j for j in range(len(lab.site_ids))],
            }
        )
    body = {
        "window_start_ms": 70.0,
        "window_end_ms": 170.0,
        "site_ids": lab.site_ids,
        "presentations": presentations,
    }
    body.update(over)
    return body


def _running(server: Server, lab: Any) -> None:
    with server.sessions() as db:
        session = db.get(RecordingSession, lab.session_id)
        assert session is not None
        session.state = SessionState.running
        db.commit()


def _post(server: Server, lab: Any, token: str, body: Any, key: str) -> Any:
    return server.client.post(
        f"/api/v1/sessions/{lab.session_id}/uploads",
        content=json.dumps(body),
        headers={**bearer(token), "Idempotency-Key": key, "Content-Type": "application/json"},
    )


def test_schedule_then_invalid_transition_is_409(server: Server) -> None:
    lab = make_lab(server, publish=False)
    staff = server.user_token(Role.staff)
    answer = server.client.post(
        "/api/v1/sessions",
        json={
            "subject_id": lab.subject_id,
            "rig_id": lab.rig_id,
            "protocol_id": lab.protocol_id,
            "scheduled_for": "2026-12-04T09:00:00Z",
        },
        headers=bearer(staff),
    )
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["state"] == "scheduled"
    assert created["site_ids"] == lab.site_ids
    assert created["model_version_id"] is not None
    before = server.counts()
    bad = server.client.post(
        f"/api/v1/sessions/{created['id']}/transitions",
        json={"to": "analysed"},
        headers=bearer(staff),
    )
    assert bad.status_code == 409
    assert "'scheduled'" in bad.json()["message"]
    assert "'analysed'" in bad.json()["message"]
    assert server.counts() == before
    ok = server.client.post(
        f"/api/v1/sessions/{created['id']}/transitions",
        json={"to": "cancelled"},
        headers=bearer(staff),
    )
    assert ok.json()["state"] == "cancelled"


def test_schedule_refuses_unknown_and_inactive_sites(server: Server) -> None:
    lab = make_lab(server, publish=False)
    staff = server.user_token(Role.staff)
    server.client.patch(
        f"/api/v1/sites/{lab.site_ids[0]}", json={"active": False}, headers=bearer(staff)
    )
    before = server.counts()
    for site_ids, expected in [([lab.site_ids[0]], "not active"), ([424242], "424242")]:
        answer = server.client.post(
            "/api/v1/sessions",
            json={
                "subject_id": lab.subject_id,
                "rig_id": lab.rig_id,
                "protocol_id": lab.protocol_id,
                "scheduled_for": "2026-12-04T09:00:00Z",
                "site_ids": site_ids,
            },
            headers=bearer(staff),
        )
        assert answer.status_code == 422
        assert expected in answer.json()["message"]
    assert server.counts() == before


def test_protocol_validation_names_the_value(server: Server) -> None:
    staff = server.user_token(Role.staff)
    for body, expected in [
        ({"name": "p", "eps_l2": [1.0, -2.0]}, "-2.0"),
        (
            {"name": "p", "eps_l2": [1.0], "window_start_ms": 170, "window_end_ms": 70},
            "window_end_ms",
        ),
        ({"name": "p", "eps_l2": [1.0], "repeats": 0}, "repeats"),
    ]:
        answer = server.client.post("/api/v1/protocols", json=body, headers=bearer(staff))
        assert answer.status_code == 422, body
        assert expected in answer.text
    good = server.client.post(
        "/api/v1/protocols", json={"name": "p", "eps_l2": [2.0, 0.5]}, headers=bearer(staff)
    )
    assert good.status_code == 201
    assert good.json()["eps_l2"] == [0.5, 2.0]
    assert len(good.json()["config_sha256"]) == 64


def test_manifest_verifies_and_images_download_resumably(server: Server) -> None:
    lab = make_lab(server)
    rig = server.rig_token(lab.rig_id)
    answer = server.client.get(
        f"/api/v1/sessions/{lab.session_id}/batch/manifest", headers=bearer(rig)
    )
    assert answer.status_code == 200, answer.text
    manifest = BatchManifest.model_validate(answer.json())
    assert manifest.content_sha256() == manifest.manifest_sha256
    assert [p.seq for p in manifest.presentations] == list(range(lab.n_planned))
    assert len({p.event_code for p in manifest.presentations}) == lab.n_planned
    assert manifest.spare_event_codes == lab.spare_codes
    assert [s.site_id for s in manifest.sites] == lab.site_ids
    again = server.client.get(
        f"/api/v1/sessions/{lab.session_id}/batch/manifest", headers=bearer(rig)
    )
    assert again.json()["manifest_sha256"] == manifest.manifest_sha256

    stimulus = manifest.stimuli[0]
    url = f"/api/v1/sessions/{lab.session_id}/batch/images/{stimulus.sha256}"
    full = server.client.get(url, headers=bearer(rig))
    assert full.status_code == 200
    assert hashlib.sha256(full.content).hexdigest() == stimulus.sha256
    assert len(full.content) == stimulus.size_bytes
    tail = server.client.get(url, headers={**bearer(rig), "Range": "bytes=10-"})
    assert tail.status_code == 206
    assert full.content[:10] + tail.content == full.content
    missing = server.client.get(
        f"/api/v1/sessions/{lab.session_id}/batch/images/{'f' * 64}", headers=bearer(rig)
    )
    assert missing.status_code == 404


def test_upload_stores_once_and_replays(server: Server) -> None:
    lab = make_lab(server)
    _running(server, lab)
    rig = server.rig_token(lab.rig_id)
    body = _chunk(lab, [0, 1, 2])
    first = _post(server, lab, rig, body, "chunk-0000-aaaa")
    assert first.status_code == 201, first.text
    assert first.json()["n_responses"] == 3 * len(lab.site_ids)
    counts = server.counts()
    replay = _post(server, lab, rig, body, "chunk-0000-aaaa")
    assert replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    assert server.counts() == counts
    different = _post(server, lab, rig, _chunk(lab, [3]), "chunk-0000-aaaa")
    assert different.status_code == 422
    assert "different body" in different.json()["message"]
    same_data_new_key = _post(server, lab, rig, body, "chunk-0000-bbbb")
    assert same_data_new_key.status_code == 422
    assert "already uploaded" in same_data_new_key.json()["message"]
    assert server.counts() == counts
    with server.sessions() as db:
        stored = db.query(Response).order_by(Response.id).all()
        assert [unpack_counts(r.counts, r.n_sites)[0] for r in stored] == [0, 1, 2]
        assert list(unpack_counts(stored[1].counts, stored[1].n_sites)) == [1, 2, 3]
        uploaded = db.query(Presentation).filter(Presentation.uploaded_at.isnot(None)).count()
        assert uploaded == 3


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda b: b["presentations"][1].update(stimulus_id=424242),
            "presentations[1]: stimulus 424242",
        ),
        (lambda b: b["presentations"][2].update(counts=[1]), "presentations[2]: 1 counts"),
        (
            lambda b: b["presentations"][1]["counts"].__setitem__(0, -1),
            "presentations[1].counts[0] is -1",
        ),
        (lambda b: b["presentations"][2].update(onset_ticks=1), "presentations[2]: onset_ticks 1"),
        (lambda b: b["presentations"][2].update(seq=0), "seq 0 appears twice"),
        (lambda b: b.update(site_ids=b["site_ids"][:-1]), "site_ids"),
        (
            lambda b: b["presentations"][1]["counts"].__setitem__(0, "NaN"),
            "presentations.1.counts.0",
        ),
    ],
    ids=["unknown-stimulus", "site-count", "negative", "onset-order", "duplicate", "sites", "nan"],
)
def test_bad_chunk_is_422_naming_the_item_and_stores_nothing(
    server: Server, mutate: Any, expected: str
) -> None:
    lab = make_lab(server)
    _running(server, lab)
    rig = server.rig_token(lab.rig_id)
    body = _chunk(lab, [0, 1, 2])
    mutate(body)
    before = server.counts()
    answer = _post(server, lab, rig, body, "chunk-bad-0001")
    assert answer.status_code == 422, answer.text
    assert expected in answer.text
    assert server.counts() == before
    # the key was not burnt: the corrected chunk goes through with it
    good = _post(server, lab, rig, _chunk(lab, [0, 1, 2]), "chunk-bad-0001")
    assert good.status_code == 201, good.text


def test_requeued_presentation_uses_a_spare_code(server: Server) -> None:
    lab = make_lab(server)
    _running(server, lab)
    rig = server.rig_token(lab.rig_id)
    body = _chunk(lab, [0])
    body["presentations"][0].update(fixation_ok=False)
    extra = dict(
        body["presentations"][0],
        seq=lab.n_planned,
        event_code=lab.spare_codes[0],
        fixation_ok=True,
        onset_ticks=90_000,
    )
    body["presentations"].append(extra)
    answer = _post(server, lab, rig, body, "chunk-requeue-1")
    assert answer.status_code == 201, answer.text
    reused = dict(extra, seq=lab.n_planned + 1, onset_ticks=120_000)
    clash = _post(server, lab, rig, {**body, "presentations": [reused]}, "chunk-requeue-2")
    assert clash.status_code == 422
    assert "already used" in clash.json()["message"]


def test_upload_guards_content_type_size_and_key(server: Server) -> None:
    lab = make_lab(server)
    _running(server, lab)
    rig = server.rig_token(lab.rig_id)
    url = f"/api/v1/sessions/{lab.session_id}/uploads"
    body = json.dumps(_chunk(lab, [0]))
    before = server.counts()
    wrong_type = server.client.post(
        url,
        content=body,
        headers={**bearer(rig), "Idempotency-Key": "k" * 12, "Content-Type": "text/plain"},
    )
    assert wrong_type.status_code == 415
    bad_key = server.client.post(
        url,
        content=body,
        headers={**bearer(rig), "Idempotency-Key": "bad key!", "Content-Type": "application/json"},
    )
    assert bad_key.status_code == 400
    huge = "x" * (server.settings.max_body_bytes + 1)
    too_big = server.client.post(
        url,
        content=huge,
        headers={**bearer(rig), "Idempotency-Key": "k" * 12, "Content-Type": "application/json"},
    )
    assert too_big.status_code == 413
    assert server.counts() == before


def test_other_rig_and_analyst_cannot_upload(server: Server) -> None:
    lab = make_lab(server)
    _running(server, lab)
    other = server.rig_token(server.rig("rig-2"))
    analyst = server.user_token(Role.analyst)
    before = server.counts()
    assert _post(server, lab, other, _chunk(lab, [0]), "chunk-x-0001").status_code == 403
    assert _post(server, lab, analyst, _chunk(lab, [0]), "chunk-x-0001").status_code == 403
    assert server.counts() == {**before, "api_tokens": before["api_tokens"]}


def test_upload_needs_a_running_session(server: Server) -> None:
    lab = make_lab(server)
    rig = server.rig_token(lab.rig_id)
    answer = _post(server, lab, rig, _chunk(lab, [0]), "chunk-early-01")
    assert answer.status_code == 409
    assert "'ready'" in answer.json()["message"]


def test_same_key_in_flight_is_409(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from itloop.server import uploads

    lab = make_lab(server)
    _running(server, lab)
    rig = server.rig_token(lab.rig_id)
    entered, release = threading.Event(), threading.Event()
    original = uploads._store

    def slow_store(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(uploads, "_store", slow_store)
    results: list[int] = []
    first = threading.Thread(
        target=lambda: results.append(
            _post(server, lab, rig, _chunk(lab, [0]), "chunk-slow-01").status_code
        )
    )
    first.start()
    assert entered.wait(10)
    second = _post(server, lab, rig, _chunk(lab, [0]), "chunk-slow-01")
    release.set()
    first.join(10)
    assert second.status_code == 409
    assert results == [201]


def test_responses_and_sessions_are_readable_by_analysts(server: Server) -> None:
    lab = make_lab(server)
    _running(server, lab)
    rig = server.rig_token(lab.rig_id)
    assert _post(server, lab, rig, _chunk(lab, [0, 1]), "chunk-read-001").status_code == 201
    analyst = server.user_token(Role.analyst)
    page = server.client.get(
        "/api/v1/responses",
        params={"session_id": lab.session_id, "limit": 2},
        headers=bearer(analyst),
    ).json()
    assert page["total"] == 2 * len(lab.site_ids)
    assert len(page["items"]) == 2
    by_site = server.client.get(
        "/api/v1/responses", params={"site_id": lab.site_ids[1]}, headers=bearer(analyst)
    ).json()
    assert [r["spike_count"] for r in by_site["items"]] == [1, 2]
    assert by_site["total"] == 2
    everything = server.client.get(
        "/api/v1/responses", params={"session_id": lab.session_id}, headers=bearer(analyst)
    ).json()["items"]
    for offset in range(len(everything)):
        page = server.client.get(
            "/api/v1/responses",
            params={"session_id": lab.session_id, "offset": offset, "limit": 2},
            headers=bearer(analyst),
        ).json()
        assert page["items"] == everything[offset : offset + 2]
    sessions = server.client.get("/api/v1/sessions", headers=bearer(analyst)).json()
    assert sessions[0]["state"] == "running"
    day = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
    assert (
        server.client.get(
            "/api/v1/sessions",
            params={"since": (day + dt.timedelta(days=1)).isoformat()},
            headers=bearer(analyst),
        ).json()
        == []
    )


def test_counts_in_any_site_order_are_stored_by_site(server: Server) -> None:
    lab = make_lab(server)
    _running(server, lab)
    rig = server.rig_token(lab.rig_id)
    body = _chunk(lab, [0, 1])
    body["site_ids"] = lab.site_ids[::-1]
    for p in body["presentations"]:
        p["counts"] = [10 * p["seq"] + site for site in body["site_ids"]]
    assert _post(server, lab, rig, body, "chunk-order-001").status_code == 201
    analyst = server.user_token(Role.analyst)
    items = server.client.get(
        "/api/v1/responses", params={"session_id": lab.session_id}, headers=bearer(analyst)
    ).json()["items"]
    assert len(items) == 2 * len(lab.site_ids)
    by_key = {(i["presentation_id"], i["site_id"]): i["spike_count"] for i in items}
    seq_of = {p: n for n, p in enumerate(sorted({i["presentation_id"] for i in items}))}
    assert all(count == 10 * seq_of[pid] + site for (pid, site), count in by_key.items())


def test_session_update_and_delete_only_before_generation(server: Server) -> None:
    lab = make_lab(server, publish=False)
    staff = server.user_token(Role.staff)
    url = f"/api/v1/sessions/{lab.session_id}"
    moved = server.client.patch(
        url, json={"scheduled_for": "2026-12-05T10:00:00Z", "notes": "moved"}, headers=bearer(staff)
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["scheduled_for"].startswith("2026-12-05T10:00:00")
    assert moved.json()["notes"] == "moved"
    analyst = server.user_token(Role.analyst)
    assert server.client.delete(url, headers=bearer(analyst)).status_code == 403
    assert server.client.delete(url, headers=bearer(staff)).status_code == 204
    assert server.client.get(url, headers=bearer(staff)).status_code == 404


def test_generated_session_cannot_be_changed_or_deleted(server: Server) -> None:
    lab = make_lab(server)
    staff = server.user_token(Role.staff)
    url = f"/api/v1/sessions/{lab.session_id}"
    before = server.counts()
    assert server.client.patch(url, json={"notes": "x"}, headers=bearer(staff)).status_code == 409
    refused = server.client.delete(url, headers=bearer(staff))
    assert refused.status_code == 409
    assert "cancel it" in refused.json()["message"]
    assert server.counts() == before
