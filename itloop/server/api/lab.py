"""Rigs, subjects and electrode arrays."""

from collections.abc import Sequence
from typing import TypeVar

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from itloop.protocol.lab import ArrayCreate, ArrayOut, RigCreate, RigOut, SubjectCreate, SubjectOut
from itloop.server import audit
from itloop.server.auth import DbSession, Principal, Reader, Writer
from itloop.server.db.tables import Base, ElectrodeArray, Rig, Subject
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
def get_rig(rig_id: int, db: DbSession, _who: Reader) -> Rig:
    return _get(db, Rig, rig_id, "rig")


@router.get("/subjects", response_model=list[SubjectOut])
def list_subjects(db: DbSession, _who: Reader) -> Sequence[Subject]:
    return db.scalars(select(Subject).order_by(Subject.id)).all()


@router.post("/subjects", response_model=SubjectOut, status_code=201)
def create_subject(body: SubjectCreate, db: DbSession, who: Writer) -> Subject:
    return _insert(db, Subject(**body.model_dump()), who, "subject")


@router.get("/subjects/{subject_id}", response_model=SubjectOut)
def get_subject(subject_id: int, db: DbSession, _who: Reader) -> Subject:
    return _get(db, Subject, subject_id, "subject")


@router.get("/arrays", response_model=list[ArrayOut])
def list_arrays(
    db: DbSession, _who: Reader, subject_id: int | None = None
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
