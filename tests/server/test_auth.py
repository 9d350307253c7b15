"""Who may do what: tokens, roles, rig scopes, cookies with CSRF; refusals leave no trace."""

from __future__ import annotations

import logging

import pytest

from itloop.server.db.tables import ApiToken, RecordingSession, Role, Subject
from itloop.server.security import TokenRedactingFilter, new_token, parse_token, redact

from .conftest import Server, bearer

pytestmark = pytest.mark.db

SUBJECT = {"name": "M1"}


def test_no_token_is_401_and_stores_nothing(server: Server) -> None:
    before = server.counts()
    answer = server.client.post("/api/v1/subjects", json=SUBJECT)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert server.client.get("/api/v1/subjects").status_code == 401
    assert server.counts() == before


def test_malformed_and_unknown_tokens_are_401(server: Server) -> None:
    assert (
        server.client.get("/api/v1/subjects", headers={"Authorization": "Basic abc"}).status_code
        == 401
    )
    assert server.client.get("/api/v1/subjects", headers=bearer("itl_nope")).status_code == 401
    forged = new_token().token
    assert server.client.get("/api/v1/subjects", headers=bearer(forged)).status_code == 401


def test_wrong_secret_for_a_real_lookup_is_401(server: Server) -> None:
    token = server.user_token(Role.staff)
    lookup, _secret = parse_token(token) or ("", "")
    tampered = f"itl_{lookup}_{new_token().token.split('_', 2)[2]}"
    assert server.client.get("/api/v1/subjects", headers=bearer(token)).status_code == 200
    assert server.client.get("/api/v1/subjects", headers=bearer(tampered)).status_code == 401


def test_analyst_reads_but_cannot_write(server: Server) -> None:
    analyst = server.user_token(Role.analyst)
    assert server.client.get("/api/v1/subjects", headers=bearer(analyst)).status_code == 200
    before = server.counts()
    for path, body in [("/api/v1/subjects", SUBJECT), ("/api/v1/rigs", {"name": "rig-a"})]:
        answer = server.client.post(path, json=body, headers=bearer(analyst))
        assert answer.status_code == 403, path
        assert "read-only" in answer.json()["message"]
    assert server.counts() == before


def test_staff_writes_and_the_audit_log_records_it(server: Server) -> None:
    staff = server.user_token(Role.staff)
    answer = server.client.post("/api/v1/subjects", json=SUBJECT, headers=bearer(staff))
    assert answer.status_code == 201, answer.text
    assert answer.json()["name"] == "M1"
    assert server.count(Subject) == 1
    assert server.counts()["audit_log"] >= 1


def _session_on_rig(server: Server, rig_id: int) -> int:
    import datetime as dt

    from itloop.server.db.tables import Protocol

    with server.sessions() as db:
        subject = Subject(name=f"S{rig_id}")
        protocol = Protocol(name=f"p{rig_id}", eps_l2=[1.0])
        db.add_all([subject, protocol])
        db.flush()
        session = RecordingSession(
            subject_id=subject.id,
            rig_id=rig_id,
            protocol_id=protocol.id,
            scheduled_for=dt.datetime(2026, 12, 3, 9, tzinfo=dt.UTC),
        )
        db.add(session)
        db.commit()
        return session.id


def test_rig_token_reaches_only_its_own_rigs_sessions(server: Server) -> None:
    rig_a, rig_b = server.rig("rig-a"), server.rig("rig-b")
    session_a, session_b = _session_on_rig(server, rig_a), _session_on_rig(server, rig_b)
    token_a = server.rig_token(rig_a)
    before = server.counts()
    other = server.client.get(
        f"/api/v1/sessions/{session_b}/batch/manifest", headers=bearer(token_a)
    )
    assert other.status_code == 403
    assert f"rig {rig_a}" in other.json()["message"]
    own = server.client.get(f"/api/v1/sessions/{session_a}/batch/manifest", headers=bearer(token_a))
    assert own.status_code == 404  # its own session, with no batch published yet
    assert "no published batch" in own.json()["message"]
    # a rig token is not a lab member's token
    assert server.client.get("/api/v1/subjects", headers=bearer(token_a)).status_code == 403
    assert server.counts() == {**before, "api_tokens": before["api_tokens"]}


def test_worker_token_cannot_touch_lab_data(server: Server) -> None:
    worker = server.worker_token()
    before = server.counts()
    assert server.client.get("/api/v1/subjects", headers=bearer(worker)).status_code == 403
    assert (
        server.client.post("/api/v1/subjects", json=SUBJECT, headers=bearer(worker)).status_code
        == 403
    )
    assert server.counts() == before


def test_revoked_token_is_401(server: Server) -> None:
    admin = server.user_token(Role.admin)
    staff = server.user_token(Role.staff)
    assert server.client.get("/api/v1/subjects", headers=bearer(staff)).status_code == 200
    with server.sessions() as db:
        staff_id = max(t.id for t in db.query(ApiToken).all())
    assert (
        server.client.delete(f"/api/v1/tokens/{staff_id}", headers=bearer(admin)).status_code == 200
    )
    before = server.counts()
    answer = server.client.post("/api/v1/subjects", json=SUBJECT, headers=bearer(staff))
    assert answer.status_code == 401
    assert "revoked" in answer.json()["message"]
    assert server.counts() == before


@pytest.mark.parametrize("param", ["access_token", "token", "api_key", "anything"])
def test_token_in_query_string_is_refused(server: Server, param: str) -> None:
    staff = server.user_token(Role.staff)
    before = server.counts()
    answer = server.client.post(f"/api/v1/subjects?{param}={staff}", json=SUBJECT)
    assert answer.status_code == 400
    assert answer.json()["error"] == "credentials_in_url"
    assert staff not in answer.text
    # refused even when the header is also sent
    answer = server.client.get(f"/api/v1/subjects?{param}={staff}", headers=bearer(staff))
    assert answer.status_code == 400
    assert server.counts() == before


def test_tokens_are_stored_hashed_and_shown_once(server: Server) -> None:
    admin = server.user_token(Role.admin)
    created = server.client.post(
        "/api/v1/tokens", json={"name": "analysis laptop"}, headers=bearer(admin)
    )
    assert created.status_code == 201, created.text
    secret = created.json()["token"]
    assert parse_token(secret) is not None
    listed = server.client.get("/api/v1/tokens", headers=bearer(admin))
    assert secret not in listed.text
    assert "token" not in listed.json()[0]
    with server.sessions() as db:
        stored = [(t.lookup, t.secret_sha256) for t in db.query(ApiToken).all()]
    assert all(secret.split("_", 2)[2] not in h for _, h in stored)
    assert server.client.get("/api/v1/subjects", headers=bearer(secret)).status_code == 200


def test_only_admins_manage_tokens(server: Server) -> None:
    staff = server.user_token(Role.staff)
    before = server.counts()
    assert (
        server.client.post("/api/v1/tokens", json={"name": "x"}, headers=bearer(staff)).status_code
        == 403
    )
    assert server.client.get("/api/v1/tokens", headers=bearer(staff)).status_code == 403
    assert server.counts() == before


def test_cookie_session_requires_csrf_for_writes(server: Server) -> None:
    server.user_token(Role.staff, email="staff@lab.test")
    login = server.client.post(
        "/api/v1/auth/login", data={"email": "staff@lab.test", "password": "correct horse battery"}
    )
    assert login.status_code == 200, login.text
    csrf = login.json()["csrf_token"]
    assert server.client.cookies.get(server.settings.session_cookie_name)
    assert server.client.get("/api/v1/auth/me").json()["email"] == "staff@lab.test"
    before = server.counts()
    refused = server.client.post("/api/v1/subjects", json=SUBJECT)
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["message"]
    wrong = server.client.post("/api/v1/subjects", json=SUBJECT, headers={"X-CSRF-Token": "x" * 32})
    assert wrong.status_code == 403
    assert server.counts() == before
    ok = server.client.post("/api/v1/subjects", json=SUBJECT, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201


def test_wrong_password_is_401_and_sets_no_cookie(server: Server) -> None:
    server.user_token(Role.staff, email="staff@lab.test")
    answer = server.client.post(
        "/api/v1/auth/login", data={"email": "staff@lab.test", "password": "wrong password!"}
    )
    assert answer.status_code == 401
    assert not server.client.cookies.get(server.settings.session_cookie_name)
    unknown = server.client.post(
        "/api/v1/auth/login", data={"email": "nobody@lab.test", "password": "wrong password!"}
    )
    assert unknown.status_code == 401


def test_orphan_array_is_refused_with_the_value_named(server: Server) -> None:
    staff = server.user_token(Role.staff)
    before = server.counts()
    answer = server.client.post(
        "/api/v1/arrays", json={"subject_id": 9999, "name": "anterior"}, headers=bearer(staff)
    )
    assert answer.status_code == 422
    assert answer.json()["field"] == "subject_id"
    assert "9999" in answer.json()["message"]
    assert server.counts() == before


def test_log_redaction_masks_tokens(caplog: pytest.LogCaptureFixture) -> None:
    token = new_token().token
    assert token not in redact(f"GET /x?h={token} 200")
    logger = logging.getLogger("itloop.test.redaction")
    logger.addFilter(TokenRedactingFilter())
    with caplog.at_level(logging.INFO, logger="itloop.test.redaction"):
        logger.info("request with %s", token)
    assert token not in caplog.text
    assert "itl_<redacted>" in caplog.text
