"""The UI in real Chromium (Debian's, through Playwright) against the app served by uvicorn.

Screenshots of every page visited land in ``test-artifacts/ui/`` (git-ignored).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from itloop.server.db.tables import Job, JobState, RecordingSession, Role, SessionState
from itloop.server.sessions import transition

from .conftest import EMAILS, PASSWORD, LiveServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 768})
    context.set_default_timeout(10_000)
    opened = context.new_page()
    yield opened
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page: Page, role: Role, *, screenshot: bool = False) -> None:
    page.goto("/sessions")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.get_by_label("Email").fill(EMAILS[role])
    page.get_by_label("Password").fill(PASSWORD)
    if screenshot:
        shot(page, "01-login")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/sessions$"))


def test_staff_schedules_a_session_and_watches_it(page: Page, live_server: LiveServer) -> None:
    ui = live_server.ui
    page.goto("/login")
    page.get_by_label("Email").fill(EMAILS[Role.staff])
    page.get_by_label("Password").fill("wrong password!")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("Wrong email or password")
    log_in(page, Role.staff, screenshot=True)
    expect(page.locator("#session-rows tr")).to_have_count(len(ui.lab.session_ids))
    shot(page, "02-sessions-list")
    page.get_by_role("link", name="Calendar").click()
    page.goto("/sessions?view=calendar&month=2026-11")
    expect(page.locator(".calitem")).to_have_count(len(ui.lab.session_ids))
    shot(page, "03-sessions-calendar")

    # An invalid form: no rig, a new protocol whose window ends before it starts.
    page.get_by_role("link", name="Schedule a session").click()
    expect(page.get_by_role("heading", name="Schedule a session")).to_be_visible()
    expect(page.locator("#expected-presentations")).to_have_text("312")
    page.get_by_label("Protocol", exact=True).select_option("new")
    page.get_by_label("Name of the new protocol").fill("short window")
    page.get_by_label("Window start (ms)").fill("170")
    page.get_by_label("Window end (ms)").fill("70")
    page.get_by_label("ε list").fill("1, 2, abc")
    expect(page.locator("#estimate")).to_contain_text("fix the protocol fields")
    shot(page, "04-schedule-form")
    page.get_by_role("button", name="Schedule", exact=True).click()
    expect(page.locator("#error-summary")).to_be_visible()
    expect(page.locator("#e-rig_id")).to_have_text("choose a rig")
    expect(page.locator("#e-eps_l2")).to_contain_text("'abc' is not a number")
    expect(page.locator("#e-window_end_ms")).to_contain_text("must be after window_start_ms")
    expect(page.get_by_label("Rig")).to_have_attribute("aria-invalid", "true")
    shot(page, "05-schedule-rejected")
    with ui.sessions() as db:
        assert db.query(RecordingSession).count() == len(ui.lab.session_ids)

    # Fix it: an existing protocol, two of the three sites; the estimate follows.
    page.get_by_label("Protocol", exact=True).select_option(str(ui.lab.protocol_id))
    page.get_by_label("Rig").select_option(str(ui.lab.rig_id))
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    page.get_by_label("Date (UTC)").fill(tomorrow.isoformat())
    page.get_by_label("aIT-2").uncheck()
    expect(page.locator("#expected-presentations")).to_have_text("208")
    expect(page.locator("#expected-length")).to_have_text("42 s")
    page.get_by_role("button", name="Schedule", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Session scheduled")
    expect(page.locator("#session-state [data-state]")).to_have_text("scheduled")
    session_id = int(page.url.rsplit("/", 1)[1].split("?")[0])
    shot(page, "06-session-scheduled")

    # The worker picks it up: the page polls and shows the new state and the job's progress.
    with ui.sessions() as db:
        session = db.get(RecordingSession, session_id)
        assert session is not None
        assert sorted(s.site_id for s in session.sites) == ui.lab.site_ids[:2]
        transition(db, session, SessionState.generating, actor=None)
        db.add(
            Job(
                kind="generate",
                state=JobState.running,
                workflow_id=f"generate-ui-{session_id}",
                session_id=session_id,
                progress=0.4,
                eta_s=125.0,
            )
        )
        db.commit()
    expect(page.locator("#session-state [data-state]")).to_have_text("generating")
    expect(page.locator("#session-live")).to_contain_text("40%, ETA 2 min 05 s")
    shot(page, "07-session-generating")

    # Cancel, with confirmation.
    page.get_by_role("link", name="Cancel session…").click()
    expect(page.get_by_role("heading", name=f"Cancel session {session_id}?")).to_be_visible()
    shot(page, "08-cancel-confirm")
    page.get_by_role("button", name=f"Yes, cancel session {session_id}").click()
    expect(page.locator("#session-state [data-state]")).to_have_text("cancelled")

    # A recorded day: coverage, per-site QC, downloads.
    page.goto(f"/sessions/{ui.lab.session_ids[-1]}")
    expect(page.locator("#site-qc tbody tr")).to_have_count(3)
    expect(page.locator("#coverage")).to_contain_text("Fixation lost")
    shot(page, "09-session-recorded")
    with page.expect_download() as download:
        page.get_by_role("link", name="NWB").click()
    assert download.value.suggested_filename.endswith(".nwb")

    page.get_by_role("link", name="Sites & arrays").click()
    expect(page.get_by_role("button", name="Deactivate site aIT-0")).to_be_visible()
    page.get_by_role("button", name="Deactivate site aIT-0").click()
    expect(page.get_by_role("status")).to_contain_text("Site deactivated")
    shot(page, "10-sites")
    page.get_by_role("link", name="aIT-1").click()
    expect(page.locator("#site-history tbody tr")).to_have_count(len(ui.lab.session_ids) + 1)
    shot(page, "11-site-history")
    page.get_by_role("link", name="Models").click()
    expect(page.locator("#models-table tbody tr")).to_have_count(len(ui.lab.model_version_ids))
    shot(page, "12-models")
    page.get_by_role("link", name=f"v{ui.lab.model_version_ids[-1]}", exact=True).first.click()
    expect(page.locator("#heldout-table tbody tr")).to_have_count(3)
    shot(page, "13-model")


def test_dashboard_shows_the_figures(page: Page, live_server: LiveServer) -> None:
    log_in(page, Role.analyst)
    page.get_by_role("link", name="Sensitivity").click()
    figures = page.locator(".figure img")
    expect(figures).to_have_count(4)
    for i in range(4):
        image = figures.nth(i)
        image.scroll_into_view_if_needed()
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 600", arg=image.element_handle()
        )
    expect(page.locator("#pairs img")).to_have_count(3 * 5)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#pairs img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    shot(page, "14-sensitivity-dashboard")
    href = page.get_by_role("link", name="data (CSV)").first.get_attribute("href")
    assert href is not None
    csv = page.request.get(href)
    assert csv.ok
    assert csv.text().startswith("series,site_id,")
    svg = page.request.get(href.replace(".csv", ".svg"))
    assert svg.headers["content-type"].startswith("image/svg+xml")


def test_admin_creates_and_revokes_a_token(page: Page, live_server: LiveServer) -> None:
    log_in(page, Role.admin)
    page.get_by_role("link", name="Admin").click()
    shot(page, "15-admin")
    tokens = page.locator("#tokens")
    tokens.get_by_label("Name").fill("analysis notebook")
    tokens.get_by_role("button", name="Create token").click()
    secret = page.locator("#new-token").input_value()
    assert secret
    shot(page, "16-token-created")
    api = f"{live_server.url}/api/v1/auth/me"
    me = httpx.get(api, headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 200
    assert me.json()["email"] == EMAILS[Role.admin]

    page.goto("/admin")
    assert secret not in page.content()
    row = page.locator("tr[data-token-name='analysis notebook']")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke token analysis notebook").click()
    expect(page.get_by_role("status")).to_contain_text("Token revoked")
    expect(row).to_contain_text("revoked")
    shot(page, "17-token-revoked")
    assert httpx.get(api, headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_analyst_cannot_reach_the_schedule_form(page: Page, live_server: LiveServer) -> None:
    log_in(page, Role.analyst)
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Schedule")).to_have_count(0)
    expect(nav.get_by_role("link", name="Admin")).to_have_count(0)
    expect(page.get_by_role("link", name="Schedule a session")).to_have_count(0)
    answer = page.goto("/sessions/new")
    assert answer is not None
    assert answer.status == 403
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    expect(page.locator("main")).to_contain_text("cannot schedule sessions")
    shot(page, "18-analyst-forbidden")
    page.goto(f"/sessions/{live_server.ui.lab.session_ids[0]}")
    expect(page.get_by_role("link", name="Cancel session…")).to_have_count(0)
    page.goto("/sites")
    expect(page.get_by_role("button", name=re.compile("activate", re.I))).to_have_count(0)
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("status")).to_contain_text("logged out")
    page.goto("/sessions")
    expect(page).to_have_url(re.compile(r"/login"))
