"""Rigs, subjects and electrode arrays."""

from collections.abc import Sequence
from typing import TypeVar

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from itloop.protocol.batches import manifest_digest
from itloop.protocol.lab import (
    ArrayCreate,
    ArrayOut,
    ProtocolCreate,
    ProtocolOut,
    RigCreate,
    RigOut,
    SiteCreate,
    SiteOut,
    SiteUpdate,
    SubjectCreate,
    SubjectOut,
)
from itloop.server import audit
from itloop.server.api.params import PathId, QueryId
from itloop.server.auth import DbSession, Principal, Reader, Writer
from itloop.server.db.tables import Base, ElectrodeArray, Protocol, RecordingSite, Rig, Subject
from itloop.server.errors import Conflict, InvalidInput, NotFound

router = APIRouter(tags=["lab"])
Row = TypeVar("Row", bound=Base)


def _insert(db: Session, row: Row, actor: Principal, what: str) -> Row:
    db.add(row)
    try:
        db.flush()
    except IntegrityError as exc:
        db.rollback()
        raise Conflict(f"{what} conflicts with an existing one: {exc.orig}") from exc
    audit.record(db, actor, f"{what}.create", what, getattr(row, "id", None))
    db.commit()
    return row


def _get(db: Session, table: type[Row], row_id: int, what: str) -> Row:
    row = db.get(table, row_id)
    if row is None:
        raise NotFound(f"{what} {row_id} does not exist", field=f"{what}_id", value=row_id)
    return row


@router.get("/rigs", response_model=list[RigOut])
def list_rigs(db: DbSession, _who: Reader) -> Sequence[Rig]:
    return db.scalars(select(Rig).order_by(Rig.id)).all()


@router.post("/rigs", response_model=RigOut, status_code=201)
def create_rig(body: RigCreate, db: DbSession, who: Writer) -> Rig:
    return _insert(db, Rig(**body.model_dump()), who, "rig")


@router.get("/rigs/{rig_id}", response_model=RigOut)
def get_rig(rig_id: PathId, db: DbSession, _who: Reader) -> Rig:
    return _get(db, Rig, rig_id, "rig")


@router.get("/subjects", response_model=list[SubjectOut])
def list_subjects(db: DbSession, _who: Reader) -> Sequence[Subject]:
    return db.scalars(select(Subject).order_by(Subject.id)).all()


@router.post("/subjects", response_model=SubjectOut, status_code=201)
def create_subject(body: SubjectCreate, db: DbSession, who: Writer) -> Subject:
    return _insert(db, Subject(**body.model_dump()), who, "subject")


@router.get("/subjects/{subject_id}", response_model=SubjectOut)
def get_subject(subject_id: PathId, db: DbSession, _who: Reader) -> Subject:
    return _get(db, Subject, subject_id, "subject")


@router.get("/arrays", response_model=list[ArrayOut])
def list_arrays(
    db: DbSession, _who: Reader, subject_id: QueryId = None
) -> Sequence[ElectrodeArray]:
    query = select(ElectrodeArray).order_by(ElectrodeArray.id)
    if subject_id is not None:
        query = query.where(ElectrodeArray.subject_id == subject_id)
    return db.scalars(query).all()


@router.post("/arrays", response_model=ArrayOut, status_code=201)
def create_array(body: ArrayCreate, db: DbSession, who: Writer) -> ElectrodeArray:
    if db.get(Subject, body.subject_id) is None:
        raise InvalidInput(
            f"subject_id {body.subject_id} does not exist",
            field="subject_id",
            value=body.subject_id,
        )
    return _insert(db, ElectrodeArray(**body.model_dump()), who, "array")


@router.get("/sites", response_model=list[SiteOut])
def list_sites(
    db: DbSession,
    _who: Reader,
    array_id: QueryId = None,
    subject_id: QueryId = None,
    active: bool | None = None,
) -> Sequence[RecordingSite]:
    query = select(RecordingSite).order_by(RecordingSite.id)
    if array_id is not None:
        query = query.where(RecordingSite.array_id == array_id)
    if subject_id is not None:
        query = query.join(ElectrodeArray).where(ElectrodeArray.subject_id == subject_id)
    if active is not None:
        query = query.where(RecordingSite.active == active)
    return db.scalars(query).all()


@router.post("/sites", response_model=SiteOut, status_code=201)
def create_site(body: SiteCreate, db: DbSession, who: Writer) -> RecordingSite:
    array = db.get(ElectrodeArray, body.array_id)
    if array is None:
        raise InvalidInput(
            f"array_id {body.array_id} does not exist", field="array_id", value=body.array_id
        )
    if body.electrode >= array.n_channels:
        raise InvalidInput(
            f"electrode {body.electrode} is outside array {array.name!r} of {array.n_channels}",
            field="electrode",
            value=body.electrode,
        )
    return _insert(db, RecordingSite(**body.model_dump()), who, "site")


@router.patch("/sites/{site_id}", response_model=SiteOut)
def update_site(site_id: PathId, body: SiteUpdate, db: DbSession, who: Writer) -> RecordingSite:
    """Activate or deactivate a site (or relabel it); history is kept."""
    site = _get(db, RecordingSite, site_id, "site")
    changes = body.model_dump(exclude_none=True)
    for name, value in changes.items():
        setattr(site, name, value)
    audit.record(db, who, "site.update", "site", site.id, **changes)
    db.commit()
    return site


@router.get("/protocols", response_model=list[ProtocolOut])
def list_protocols(db: DbSession, _who: Reader) -> Sequence[Protocol]:
    return db.scalars(select(Protocol).order_by(Protocol.id)).all()


@router.post("/protocols", response_model=ProtocolOut, status_code=201)
def create_protocol(body: ProtocolCreate, db: DbSession, who: Writer) -> Protocol:
    values = body.model_dump(mode="json")
    digest = manifest_digest({k: v for k, v in values.items() if k != "name"})
    return _insert(db, Protocol(**values, config_sha256=digest), who, "protocol")


@router.get("/protocols/{protocol_id}", response_model=ProtocolOut)
def get_protocol(protocol_id: PathId, db: DbSession, _who: Reader) -> Protocol:
    return _get(db, Protocol, protocol_id, "protocol")
