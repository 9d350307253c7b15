"""Pages over HTTP (TestClient), on both databases: roles, CSRF, validation, figures, exports."""

from __future__ import annotations

import csv
import io
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from itloop.server.db.tables import AuditEntry, RecordingSession, RecordingSite, Role

from .conftest import UiLab, login, today_plus

pytestmark = pytest.mark.db


def _pages(ui: UiLab) -> list[str]:
    lab = ui.lab
    return [
        "/sessions",
        "/sessions?view=calendar&month=2026-11",
        "/sessions/rows",
        f"/sessions/{lab.session_ids[-1]}",
        f"/sessions/{lab.session_ids[-1]}/live",
        "/sites",
        f"/sites/{lab.site_ids[0]}",
        "/models",
        f"/models/{lab.model_version_ids[-1]}",
        "/sensitivity",
    ]


def test_login_is_required_and_checked(ui: UiLab, client: TestClient) -> None:
    for path in [*_pages(ui), "/sessions/new", "/admin"]:
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next=")
    polled = client.get("/sessions/rows", headers={"HX-Request": "true"}, follow_redirects=False)
    assert polled.headers["HX-Redirect"].startswith("/login")
    bad = client.post("/login", data={"email": "staff@lab.test", "password": "nope nope nope"})
    assert bad.status_code == 401
    assert "Wrong email or password" in bad.text
    answer = client.post(
        "/login",
        data={
            "email": "staff@lab.test",
            "password": "correct horse battery",
            "next": "//evil.example",
        },
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/"


def test_pages_render_for_each_role(ui: UiLab, client: TestClient) -> None:
    for role in (Role.analyst, Role.staff, Role.admin):
        login(client, role)
        for path in _pages(ui):
            answer = client.get(path)
            assert answer.status_code == 200, (role, path, answer.text[:2000])
            if not path.endswith(("/rows", "/live")):
                assert '<main id="main"' in answer.text
                assert ('href="/sessions/new"' in answer.text) is (role is not Role.analyst)
        assert client.get("/admin").status_code == (200 if role is Role.admin else 403)


def test_analysts_change_nothing(ui: UiLab, client: TestClient) -> None:
    csrf = login(client, Role.analyst)
    lab = ui.lab
    before = _audit_count(ui)
    refused = {
        "/sessions/new": client.get("/sessions/new"),
        "post /sessions/new": client.post("/sessions/new", data={"csrf_token": csrf}),
        "estimate": client.post("/sessions/estimate", data={"csrf_token": csrf}),
        "cancel": client.post(f"/sessions/{lab.session_ids[0]}/cancel", data={"csrf_token": csrf}),
        "site": client.post(
            f"/sites/{lab.site_ids[0]}/active", data={"csrf_token": csrf, "active": "false"}
        ),
        "token": client.post("/admin/tokens", data={"csrf_token": csrf, "name": "x"}),
    }
    for what, answer in refused.items():
        assert answer.status_code == 403, what
        assert "analyst" in answer.text, what
    assert _audit_count(ui) == before
    with ui.sessions() as db:
        site = db.get(RecordingSite, lab.site_ids[0])
        assert site is not None
        assert site.active


def test_unsafe_requests_need_the_csrf_token(ui: UiLab, client: TestClient) -> None:
    login(client, Role.staff)
    answer = client.post(f"/sites/{ui.lab.site_ids[0]}/active", data={"active": "false"})
    assert answer.status_code == 403
    assert "CSRF" in answer.text
    assert client.post("/logout").status_code == 403


def _audit_count(ui: UiLab) -> int:
    with ui.sessions() as db:
        return int(db.scalar(select(func.count()).select_from(AuditEntry)) or 0)


def test_schedule_form_rejects_then_accepts(ui: UiLab, client: TestClient) -> None:
    csrf = login(client, Role.staff)
    lab = ui.lab
    form = {
        "csrf_token": csrf,
        "subject_id": str(lab.subject_id),
        "rig_id": "",
        "date": "2020-01-01",
        "time": "09:00",
        "protocol_id": "new",
        "protocol_name": "paper-M1",
        "eps_l2": "1, 1",
        "images_per_site": "0",
        "repeats": "2",
        "on_ms": "100",
        "off_ms": "100",
        "size_deg": "8",
        "window_start_ms": "70",
        "window_end_ms": "170",
        "attack_steps": "100",
        "controls": "noise",
        "sites_shown": "1",
    }
    rejected = client.post("/sessions/new", data=form)
    assert rejected.status_code == 422
    for field in ("rig_id", "date", "protocol_name", "images_per_site"):
        assert re.search(rf'id="e-{field}"', rejected.text), field
    assert "2020-01-01 is in the past" in rejected.text
    assert "a protocol named &#39;paper-M1&#39; exists" in rejected.text
    assert 'id="e-site_ids"' in rejected.text
    with ui.sessions() as db:
        assert db.scalar(select(func.count()).select_from(RecordingSession)) == len(lab.session_ids)

    estimate = client.post(
        "/sessions/estimate",
        data={
            **form,
            "protocol_name": "fast",
            "eps_l2": "1, 2",
            "images_per_site": "10",
            "site_ids": [str(s) for s in lab.site_ids],
        },
    )
    # 3 sites × 10 images × (1 + 2 ε × (1 attack + 1 control)) × 2 repeats
    assert 'id="expected-presentations">300<' in estimate.text
    assert "1 min 00 s" in estimate.text

    accepted = client.post(
        "/sessions/new",
        data={
            **form,
            "rig_id": str(lab.rig_id),
            "date": today_plus(2),
            "protocol_name": "fast",
            "eps_l2": "2, 1",
            "images_per_site": "10",
            "site_ids": [str(lab.site_ids[1])],
        },
        follow_redirects=False,
    )
    assert accepted.status_code == 303, accepted.text
    session_id = int(accepted.headers["location"].split("/")[2].split("?")[0])
    with ui.sessions() as db:
        session = db.get(RecordingSession, session_id)
        assert session is not None
        assert [s.site_id for s in session.sites] == [lab.site_ids[1]]
        assert session.protocol.eps_l2 == [1.0, 2.0]
        assert session.protocol.controls == ["noise"]


def test_figures_and_their_data(ui: UiLab, client: TestClient) -> None:
    login(client, Role.analyst)
    lab = ui.lab
    for name in ("bound_vs_eps", "days", "controls", "image_curves"):
        query = f"subject_id={lab.subject_id}&site_id={lab.site_ids[0]}"
        png = client.get(f"/figures/{name}.png?{query}")
        assert png.status_code == 200
        assert png.content.startswith(b"\x89PNG")
        svg = client.get(f"/figures/{name}.svg?{query}")
        assert svg.text.lstrip().startswith("<?xml")
        rows = list(csv.DictReader(io.StringIO(client.get(f"/figures/{name}.csv?{query}").text)))
        assert rows, name
    fig1 = list(
        csv.DictReader(
            io.StringIO(client.get(f"/figures/bound_vs_eps.csv?subject_id={lab.subject_id}").text)
        )
    )
    means = [r for r in fig1 if r["series"] == "mean over sites"]
    assert [float(r["eps_l2"]) for r in means] == [0.5, 1.0, 2.0, 4.0]
    assert all(r["day"] == lab.days[-1].isoformat() for r in means)
    values = [float(r["value"]) for r in means]
    assert values == sorted(values)  # the constructed bound rises with ε
    assert any(r["series"] == "clean-image σ" and float(r["value"]) == 1.0 for r in fig1)
    days = list(
        csv.DictReader(
            io.StringIO(client.get(f"/figures/days.csv?subject_id={lab.subject_id}").text)
        )
    )
    at_half = [
        float(r["value"]) for r in days if r["series"].startswith("day ") and r["eps_l2"] == "0.5"
    ]
    assert at_half == sorted(at_half)
    assert len(at_half) == len(lab.days)
    assert client.get("/figures/image_curves.png?subject_id=1").status_code == 422
    assert client.get("/figures/nope.png?subject_id=1").status_code == 404


def test_artifacts_serve_only_stimulus_images(ui: UiLab, client: TestClient) -> None:
    login(client, Role.analyst)
    page = client.get("/sensitivity").text
    sha = re.search(r"/artifacts/([0-9a-f]{64})", page)
    assert sha is not None
    image = client.get(f"/artifacts/{sha.group(1)}")
    assert image.status_code == 200
    assert image.content.startswith(b"\x89PNG")
    checkpoint = ui.store.put(b"not an image")
    assert client.get(f"/artifacts/{checkpoint}").status_code == 404
    assert client.get("/static/ui/vendor/htmx.min.js").status_code == 200
    assert client.get("/static/ui/../rendering.py").status_code == 404
