"""Wire models for rigs, subjects, arrays and recording sites."""

from __future__ import annotations

import datetime as dt
import math
from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from itloop.protocol.common import MAX_INT32, Id, WireModel


class RigCreate(WireModel):
    name: str = Field(min_length=1, max_length=80)
    description: str = ""
    monitor_width_cm: float | None = Field(default=None, gt=0)
    viewing_distance_cm: float | None = Field(default=None, gt=0)
    resolution_w_px: int | None = Field(default=None, gt=0, le=100_000)
    resolution_h_px: int | None = Field(default=None, gt=0, le=100_000)
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
    subject_id: Id
    name: str = Field(min_length=1, max_length=80)
    region: str = "IT"
    n_channels: int = Field(default=96, gt=0, le=4096)
    serial: str = ""
    implanted_on: dt.date | None = None


class ArrayOut(ArrayCreate):
    id: int
    created_at: dt.datetime


class SiteCreate(WireModel):
    array_id: Id
    electrode: int = Field(ge=0, le=4095, description="electrode index within the array")
    acq_channel: int = Field(ge=0, le=MAX_INT32, description="channel id in the acquisition system")
    label: str = Field(default="", max_length=80)
    active: bool = True


class SiteOut(SiteCreate):
    id: int
    created_at: dt.datetime


class SiteUpdate(WireModel):
    active: bool | None = None
    label: str | None = Field(default=None, max_length=80)


class ControlKind(StrEnum):
    noise = "noise"
    interpolation = "interpolation"


class ProtocolCreate(WireModel):
    """Experimental settings of a session (defaults: the paper's)."""

    name: str = Field(min_length=1, max_length=120)
    eps_l2: list[float] = Field(min_length=1, max_length=32, description="L2 budgets in [0,1] RGB")
    images_per_site: int = Field(default=42, gt=0, le=10_000)
    repeats: int = Field(default=2, ge=1, le=100)
    on_ms: float = Field(default=100.0, gt=0, le=10_000)
    off_ms: float = Field(default=100.0, ge=0, le=10_000)
    size_deg: float = Field(default=8.0, gt=0, le=90)
    window_start_ms: float = Field(default=70.0, ge=0)
    window_end_ms: float = Field(default=170.0, gt=0)
    controls: list[ControlKind] = Field(
        default_factory=lambda: [ControlKind.noise, ControlKind.interpolation]
    )
    image_source: str = Field(default="", description="ImageNet-style folder of class folders")
    attack_steps: int = Field(default=100, gt=0, le=10_000)
    images_per_trial: int = Field(default=8, ge=1, le=100)
    min_partner_spacing_s: float = Field(default=0.0, ge=0)
    allow_image_reuse: bool = False

    @field_validator("eps_l2")
    @classmethod
    def _eps_positive_unique(cls, value: list[float]) -> list[float]:
        for eps in value:
            if not (math.isfinite(eps) and eps > 0):
                raise ValueError(f"eps_l2 value {eps} must be a positive finite number")
        if len(set(value)) != len(value):
            raise ValueError(f"eps_l2 {value} lists a budget twice")
        return sorted(value)

    @model_validator(mode="after")
    def _window_ordered(self) -> ProtocolCreate:
        if self.window_end_ms <= self.window_start_ms:
            raise ValueError(
                f"window_end_ms {self.window_end_ms} must be after window_start_ms "
                f"{self.window_start_ms}"
            )
        return self


class ProtocolOut(ProtocolCreate):
    id: int
    config_sha256: str
    created_at: dt.datetime
