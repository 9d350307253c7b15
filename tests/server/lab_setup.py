"""Rows every lab in the tests starts from: a subject whose sites sit on one array, and a session
of all of them scheduled."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from itloop.server.auth import Principal
from itloop.server.db.tables import (
    ElectrodeArray,
    RecordingSession,
    RecordingSite,
    Role,
    Subject,
    TokenKind,
)
from itloop.server.sessions import schedule

__all__ = ["STAFF", "add_subject_with_sites", "schedule_every_site"]

STAFF = Principal(kind=TokenKind.user, user_id=None, role=Role.staff)


def add_subject_with_sites(db: Session, n_sites: int) -> tuple[Subject, list[RecordingSite]]:
    """Subject M1 with a 96-channel array, aIT, of ``n_sites`` sites on acquisition channels
    1..n_sites (flushed: every row has its id)."""
    subject = Subject(name="M1")
    db.add(subject)
    db.flush()
    array = ElectrodeArray(subject_id=subject.id, name="aIT", n_channels=96)
    db.add(array)
    db.flush()
    sites = [
        RecordingSite(array_id=array.id, electrode=i, acq_channel=i + 1) for i in range(n_sites)
    ]
    db.add_all(sites)
    db.flush()
    return subject, sites


def schedule_every_site(
    db: Session, subject_id: int, rig_id: int, protocol_id: int
) -> RecordingSession:
    """A session of every site of the subject on the rig, scheduled by staff for 2026-12-03."""
    return schedule(
        db,
        subject_id=subject_id,
        rig_id=rig_id,
        protocol_id=protocol_id,
        scheduled_for=dt.datetime(2026, 12, 3, 9, tzinfo=dt.UTC),
        site_ids=None,
        notes="",
        actor=STAFF,
    )
