"""Wire models for rigs, subjects, arrays and recording sites."""

from __future__ import annotations

import datetime as dt

from pydantic import Field

from itloop.protocol.common import WireModel


class RigCreate(WireModel):
    name: str = Field(min_length=1, max_length=80)
    description: str = ""
    monitor_width_cm: float | None = Field(default=None, gt=0)
    viewing_distance_cm: float | None = Field(default=None, gt=0)
    resolution_w_px: int | None = Field(default=None, gt=0)
    resolution_h_px: int | None = Field(default=None, gt=0)
    refresh_rate_hz: float | None = Field(default=None, gt=0)


class RigOut(RigCreate):
    id: int
    created_at: dt.datetime


class SubjectCreate(WireModel):
    name: str = Field(min_length=1, max_length=80)
    species: str = "Macaca mulatta"
    sex: str = Field(default="U", pattern="^[MFU]$")
    date_of_birth: dt.date | None = None
    notes: str = ""


class SubjectOut(SubjectCreate):
    id: int
    created_at: dt.datetime


class ArrayCreate(WireModel):
    subject_id: int
    name: str = Field(min_length=1, max_length=80)
    region: str = "IT"
    n_channels: int = Field(default=96, gt=0, le=4096)
    serial: str = ""
    implanted_on: dt.date | None = None


class ArrayOut(ArrayCreate):
    id: int
    created_at: dt.datetime
