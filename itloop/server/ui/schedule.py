"""The schedule form: subject, rig, time, a protocol picked or created, the sites to record.

Errors are collected per field (``errors[field] = message``) and shown next to that field; the
expected number of presentations and the session length are computed from the protocol before
anything is saved.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from itloop.protocol.batches import manifest_digest
from itloop.protocol.lab import ControlKind, ProtocolCreate
from itloop.server import audit
from itloop.server import sessions as service
from itloop.server.auth import DbSession
from itloop.server.db.tables import (
    ElectrodeArray,
    Protocol,
    RecordingSite,
    Rig,
    Subject,
)
from itloop.server.errors import InvalidInput, ItloopError
from itloop.server.ui.rendering import ViewerDep, forbidden, render

router = APIRouter()

NEW = "new"
MAX_PRESENTATIONS = 65535 - 1024
"""Event codes are 16-bit words; leave room for the spare codes of re-queued presentations."""
PROTOCOL_FIELDS = (
    "eps_l2",
    "images_per_site",
    "repeats",
    "on_ms",
    "off_ms",
    "size_deg",
    "window_start_ms",
    "window_end_ms",
    "image_source",
    "attack_steps",
)
DEFAULTS: dict[str, str] = {
    "eps_l2": "0.5, 1, 2, 4, 10",
    "images_per_site": "42",
    "repeats": "2",
    "on_ms": "100",
    "off_ms": "100",
    "size_deg": "8",
    "window_start_ms": "70",
    "window_end_ms": "170",
    "image_source": "",
    "attack_steps": "100",
}


@dataclass(frozen=True)
class Estimate:
    n_sites: int
    stimuli_per_image: int
    presentations: int
    seconds: float
    too_many: bool


def estimate(
    *,
    n_sites: int,
    images_per_site: int,
    n_eps: int,
    n_controls: int,
    repeats: int,
    on_ms: float,
    off_ms: float,
) -> Estimate:
    """Each clean image per site, plus per ε one attack and one stimulus per control, × repeats."""
    per_image = 1 + n_eps * (1 + n_controls)
    presentations = n_sites * images_per_site * per_image * repeats
    seconds = presentations * (on_ms + off_ms) / 1000.0
    return Estimate(n_sites, per_image, presentations, seconds, presentations > MAX_PRESENTATIONS)


def _protocol_values(form: FormData) -> dict[str, Any]:
    values: dict[str, Any] = {k: str(form.get(k, "")).strip() for k in PROTOCOL_FIELDS}
    values["name"] = str(form.get("protocol_name", "")).strip()
    values["controls"] = [c for c in form.getlist("controls") if c in ControlKind.__members__]
    return values


def _parse_eps(raw: str) -> list[float] | str:
    parts = [p for p in raw.replace(";", ",").replace(" ", ",").split(",") if p]
    if not parts:
        return "enter at least one ε, e.g. 0.5, 1, 2"
    out = []
    for part in parts:
        try:
            out.append(float(part))
        except ValueError:
            return f"{part!r} is not a number"
    return out


def validate_protocol(values: dict[str, Any]) -> tuple[ProtocolCreate | None, dict[str, str]]:
    """A ``ProtocolCreate`` from the form's strings, or errors by form field."""
    errors: dict[str, str] = {}
    data: dict[str, Any] = {"name": values["name"] or "(unnamed)", "controls": values["controls"]}
    eps = _parse_eps(values["eps_l2"])
    if isinstance(eps, str):
        errors["eps_l2"] = eps
        eps = [1.0]  # a stand-in, so that the other fields are still checked
    data["eps_l2"] = eps
    for key in PROTOCOL_FIELDS:
        if key in ("eps_l2", "image_source"):
            continue
        if values[key] == "":
            errors[key] = "required"
        else:
            data[key] = values[key]
    data["image_source"] = values["image_source"]
    if any(key in errors for key in PROTOCOL_FIELDS if key != "eps_l2"):
        return None, errors
    try:
        protocol = ProtocolCreate.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = [str(p) for p in error["loc"]]
            field = loc[0] if loc else "window_end_ms"
            if field == "name":
                field = "protocol_name"
            message = str(error["msg"]).removeprefix("Value error, ")
            errors.setdefault(field, message)
        return None, errors
    return (None, errors) if errors else (protocol, {})


def _sites_of(db: Session, subject_id: int | None) -> list[tuple[RecordingSite, str]]:
    if subject_id is None:
        return []
    return [
        (site, array)
        for site, array in db.execute(
            select(RecordingSite, ElectrodeArray.name)
            .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
            .where(ElectrodeArray.subject_id == subject_id)
            .order_by(ElectrodeArray.name, RecordingSite.electrode)
        ).all()
    ]


def _as_id(raw: object) -> int | None:
    text = str(raw or "").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 2**63 else None


def _estimate_for(db: Session, form: FormData) -> tuple[Estimate | None, str | None]:
    """The estimate of what the form describes, or why it cannot be computed yet."""
    subject_id = _as_id(form.get("subject_id"))
    chosen = {i for i in (_as_id(v) for v in form.getlist("site_ids")) if i is not None}
    sites = _sites_of(db, subject_id)
    n_sites = (
        len([s for s, _a in sites if s.id in chosen])
        if "sites_shown" in form
        else len([s for s, _a in sites if s.active])
    )
    protocol_choice = str(form.get("protocol_id", ""))
    if protocol_choice == NEW:
        protocol, _errors = validate_protocol(_protocol_values(form))
        if protocol is None:
            return None, "fix the protocol fields to see the estimate"
        eps, controls = len(protocol.eps_l2), len(protocol.controls)
        images, repeats = protocol.images_per_site, protocol.repeats
        on_ms, off_ms = protocol.on_ms, protocol.off_ms
    else:
        row = db.get(Protocol, _as_id(protocol_choice) or 0)
        if row is None:
            return None, "pick a protocol to see the estimate"
        eps, controls = len(row.eps_l2), len(row.controls)
        images, repeats, on_ms, off_ms = row.images_per_site, row.repeats, row.on_ms, row.off_ms
    if n_sites == 0:
        return None, "choose a subject and at least one site to see the estimate"
    return (
        estimate(
            n_sites=n_sites,
            images_per_site=images,
            n_eps=eps,
            n_controls=controls,
            repeats=repeats,
            on_ms=on_ms,
            off_ms=off_ms,
        ),
        None,
    )


def _form_context(db: Session, form: dict[str, Any]) -> dict[str, Any]:
    subject_id = _as_id(form.get("subject_id"))
    return {
        "subjects": list(db.scalars(select(Subject).order_by(Subject.name))),
        "rigs": list(db.scalars(select(Rig).order_by(Rig.name))),
        "protocols": list(db.scalars(select(Protocol).order_by(Protocol.name))),
        "sites": _sites_of(db, subject_id),
        "control_kinds": [c.value for c in ControlKind],
        "NEW": NEW,
    }


def _initial_form(db: Session) -> dict[str, Any]:
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    subject = db.scalar(select(Subject).order_by(Subject.name).limit(1))
    protocol = db.scalar(select(Protocol).order_by(Protocol.name).limit(1))
    form: dict[str, Any] = {
        "subject_id": str(subject.id) if subject else "",
        "rig_id": "",
        "date": tomorrow.isoformat(),
        "time": "09:00",
        "protocol_id": str(protocol.id) if protocol else NEW,
        "protocol_name": "",
        "controls": [c.value for c in ControlKind],
        "site_ids": None,
        "notes": "",
        **DEFAULTS,
    }
    return form


@router.get("/sessions/new", response_class=HTMLResponse)
def schedule_form(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.can_write:
        return forbidden(request, viewer, "schedule sessions")
    form = _initial_form(db)
    form_data = FormData(
        [(k, v) for k, v in form.items() if isinstance(v, str)]
        + [("controls", c) for c in form["controls"]]
    )
    est, why = _estimate_for(db, form_data)
    return render(
        request,
        "schedule.html",
        viewer,
        form=form,
        errors={},
        estimate=est,
        estimate_note=why,
        **_form_context(db, form),
    )


@router.get("/sessions/new/sites", response_class=HTMLResponse)
def schedule_sites(
    request: Request, viewer: ViewerDep, db: DbSession, subject_id: str = ""
) -> Response:
    if not viewer.can_write:
        return forbidden(request, viewer, "schedule sessions")
    return render(
        request,
        "_schedule_sites.html",
        viewer,
        sites=_sites_of(db, _as_id(subject_id)),
        form={"site_ids": None},
        errors={},
    )


@router.post("/sessions/estimate", response_class=HTMLResponse)
async def schedule_estimate(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.can_write:
        return forbidden(request, viewer, "schedule sessions")
    form = await request.form()
    est, why = _estimate_for(db, form)
    return render(request, "_estimate.html", viewer, estimate=est, estimate_note=why)


@router.post("/sessions/new", response_class=HTMLResponse)
async def schedule_submit(request: Request, viewer: ViewerDep, db: DbSession) -> Response:
    if not viewer.can_write:
        return forbidden(request, viewer, "schedule sessions")
    data = await request.form()
    form: dict[str, Any] = {
        key: str(data.get(key, "")).strip()
        for key in ("subject_id", "rig_id", "date", "time", "protocol_id", "protocol_name", "notes")
    }
    form.update({k: str(data.get(k, "")).strip() for k in PROTOCOL_FIELDS})
    form["controls"] = list(data.getlist("controls"))
    form["site_ids"] = [i for i in (_as_id(v) for v in data.getlist("site_ids")) if i]
    errors: dict[str, str] = {}

    subject_id = _as_id(form["subject_id"])
    if subject_id is None or db.get(Subject, subject_id) is None:
        errors["subject_id"] = "choose a subject"
    rig_id = _as_id(form["rig_id"])
    if rig_id is None or db.get(Rig, rig_id) is None:
        errors["rig_id"] = "choose a rig"
    scheduled_for = None
    try:
        day = dt.date.fromisoformat(form["date"])
        at = dt.time.fromisoformat(form["time"] or "09:00")
        scheduled_for = dt.datetime.combine(day, at, tzinfo=dt.UTC)
        if scheduled_for < dt.datetime.now(dt.UTC) - dt.timedelta(days=1):
            errors["date"] = f"{day.isoformat()} is in the past"
    except ValueError:
        errors["date"] = f"{form['date'] or '(empty)'} is not a date and time (YYYY-MM-DD, HH:MM)"

    protocol_row: Protocol | None = None
    new_protocol: ProtocolCreate | None = None
    if form["protocol_id"] == NEW:
        if not form["protocol_name"]:
            errors["protocol_name"] = "name the new protocol"
        elif db.scalar(select(Protocol.id).where(Protocol.name == form["protocol_name"])):
            errors["protocol_name"] = f"a protocol named {form['protocol_name']!r} exists"
        new_protocol, protocol_errors = validate_protocol(_protocol_values(data))
        errors.update({k: v for k, v in protocol_errors.items() if k not in errors})
    else:
        protocol_row = db.get(Protocol, _as_id(form["protocol_id"]) or 0)
        if protocol_row is None:
            errors["protocol_id"] = "choose a protocol or create one"

    if "sites_shown" in data and not form["site_ids"] and "subject_id" not in errors:
        errors["site_ids"] = "choose at least one site"
    est, why = _estimate_for(db, data)
    if est is not None and est.too_many:
        errors.setdefault(
            "images_per_site",
            f"{est.presentations:,} presentations exceed the {MAX_PRESENTATIONS:,} event codes "
            "of one session; use fewer images, ε or repeats",
        )

    if not errors and subject_id and rig_id and scheduled_for:
        try:
            if new_protocol is not None:
                values = new_protocol.model_dump(mode="json")
                values["name"] = form["protocol_name"]
                digest = manifest_digest({k: v for k, v in values.items() if k != "name"})
                protocol_row = Protocol(**values, config_sha256=digest)
                db.add(protocol_row)
                db.flush()
                audit.record(db, viewer.principal, "protocol.create", "protocol", protocol_row.id)
            if protocol_row is None:
                raise InvalidInput("choose a protocol or create one", field="protocol_id")
            session = service.schedule(
                db,
                subject_id=subject_id,
                rig_id=rig_id,
                protocol_id=protocol_row.id,
                scheduled_for=scheduled_for,
                site_ids=form["site_ids"] if "sites_shown" in data else None,
                notes=form["notes"],
                actor=viewer.principal,
            )
            db.commit()
        except ItloopError as exc:
            db.rollback()
            errors[exc.field or "form"] = exc.message
        else:
            enqueue = getattr(request.app.state, "enqueue_generation", None)
            if enqueue is not None:
                enqueue(session.id)
            return RedirectResponse(f"/sessions/{session.id}?notice=scheduled", status_code=303)

    return render(
        request,
        "schedule.html",
        viewer,
        status_code=422,
        form=form,
        errors=errors,
        estimate=est,
        estimate_note=why,
        **_form_context(db, form),
    )
