"""Wire models for sessions, model versions, sensitivity results and responses."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import Field

from itloop.protocol.batches import StimulusKind
from itloop.protocol.common import Id, WireModel

T = TypeVar("T")


class SessionState(StrEnum):
    scheduled = "scheduled"
    generating = "generating"
    ready = "ready"
    running = "running"
    uploaded = "uploaded"
    analysed = "analysed"
    failed = "failed"
    cancelled = "cancelled"


class SessionCreate(WireModel):
    subject_id: Id
    rig_id: Id
    protocol_id: Id
    scheduled_for: dt.datetime
    site_ids: list[Id] | None = Field(
        default=None, description="sites to record and attack; default: the subject's active sites"
    )
    notes: str = ""


class SessionOut(WireModel):
    id: int
    subject_id: int
    rig_id: int
    protocol_id: int
    model_version_id: int | None
    scheduled_for: dt.datetime
    state: SessionState
    state_changed_at: dt.datetime
    error: str | None
    notes: str
    site_ids: list[int]
    created_at: dt.datetime


class SessionUpdate(WireModel):
    """What may change while a session is still ``scheduled``."""

    scheduled_for: dt.datetime | None = None
    notes: str | None = Field(default=None, max_length=10_000)


class SessionTransition(WireModel):
    to: SessionState
    reason: str | None = Field(default=None, max_length=2000)


class Page(WireModel, Generic[T]):
    items: list[T]
    total: int
    offset: int
    limit: int


class ModelVersionOut(WireModel):
    id: int
    subject_id: int
    parent_id: int | None
    backbone: str
    layer: str
    config: dict[str, Any]
    checkpoint_sha256: str
    training_data_fingerprint: str
    n_trials: int
    metrics: dict[str, Any]
    code_version: str
    created_at: dt.datetime


class SensitivityResultOut(WireModel):
    """Normalised sign-corrected lower bound of one site at one ε on one day."""

    analysis_id: int
    site_id: int
    day: dt.date
    eps_l2: float
    kind: StimulusKind
    n_images: int
    lower_bound: float
    lower_bound_normalised: float
    ci_low: float
    ci_high: float
    sigma_clean: float
    naive_abs_normalised: float = Field(description="mean |Δr| / σ: biased upward by noise")
    rms_normalised: float = Field(description="RMS Δr / σ, the paper's control measure")


class ResponseOut(WireModel):
    presentation_id: int
    session_id: int
    stimulus_id: int
    site_id: int
    spike_count: int
    window_start_ms: float
    window_end_ms: float
    complete: bool
    valid: bool | None
    fixation_ok: bool | None
