"""Wire models between the server and the rig: the batch manifest and the upload of a recording."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from itloop.protocol.common import MAX_ID, MAX_INT32, Id, WireModel

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
EventCode = Annotated[int, Field(ge=1, le=65535, description="digital word sent at onset")]
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{8,200}$"


class StimulusKind(StrEnum):
    clean = "clean"
    attack = "attack"
    noise = "noise"
    interpolation = "interpolation"


class PresentationTiming(WireModel):
    """How every image of the batch is shown (converted to frames on the rig)."""

    on_ms: float = Field(gt=0)
    off_ms: float = Field(ge=0)
    size_deg: float = Field(gt=0)
    images_per_trial: int = Field(ge=1)


class ManifestSite(WireModel):
    site_id: int
    acq_channel: int = Field(ge=0, description="channel id in the acquisition system")
    array: str
    electrode: int = Field(ge=0)


class ManifestStimulus(WireModel):
    stimulus_id: int
    sha256: Sha256
    size_bytes: int = Field(gt=0)
    width_px: int = Field(gt=0)
    height_px: int = Field(gt=0)
    kind: StimulusKind


class PlannedPresentation(WireModel):
    seq: int = Field(ge=0, description="position in the session's presentation order")
    stimulus_id: int
    event_code: EventCode
    trial_index: int = Field(ge=0, description="fixation trial this presentation belongs to")


class BatchManifest(WireModel):
    """Everything the rig needs to run a session; ``manifest_sha256`` covers all other fields."""

    session_id: int
    rig_id: int
    subject: str
    published_at: dt.datetime
    timing: PresentationTiming
    window_start_ms: float = Field(ge=0)
    window_end_ms: float = Field(gt=0)
    spare_event_codes: list[EventCode] = Field(
        default_factory=list, description="codes reserved for presentations re-queued on the rig"
    )
    sites: list[ManifestSite]
    stimuli: list[ManifestStimulus]
    presentations: list[PlannedPresentation]
    manifest_sha256: Sha256

    def content_sha256(self) -> str:
        """The SHA-256 of the canonical JSON of every field but ``manifest_sha256``."""
        return manifest_digest(self.model_dump(mode="json", exclude={"manifest_sha256"}))


def manifest_digest(content: dict[str, object]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class UploadedPresentation(WireModel):
    """One presentation as it happened on the rig, with its per-site spike counts."""

    seq: int = Field(
        ge=0, le=MAX_INT32, description="planned seq, or a new seq for a re-queued presentation"
    )
    stimulus_id: Id
    event_code: EventCode
    onset_ticks: int | None = Field(
        ge=0, le=MAX_ID, description="acquisition-clock onset; None if missing"
    )
    tick_rate_hz: int = Field(gt=0, le=10**9)
    photodiode_delay_ticks: int | None = Field(default=None, ge=-(10**9), le=10**9)
    fixation_ok: bool
    frame_drops: int = Field(ge=0, le=MAX_INT32)
    valid: bool = True
    invalid_reason: str | None = Field(default=None, max_length=200)
    complete: bool = Field(default=True, description="False if the window ran past the recording")
    counts: list[Annotated[int, Field(le=MAX_INT32)]] = Field(
        description="spike counts, one per site of the chunk's site_ids"
    )

    @field_validator("counts", mode="before")
    @classmethod
    def _counts_are_finite(cls, value: object) -> object:
        if isinstance(value, list):
            for i, count in enumerate(value):
                if isinstance(count, float) and not math.isfinite(count):
                    raise ValueError(f"counts[{i}] is {count}, not a finite count")
        return value

    @model_validator(mode="after")
    def _invalid_has_reason(self) -> UploadedPresentation:
        if not self.valid and not self.invalid_reason:
            raise ValueError(f"presentation seq {self.seq} is invalid but gives no invalid_reason")
        return self


class UploadChunk(WireModel):
    """Part of a session's recording, stored whole or not at all."""

    window_start_ms: float = Field(ge=0)
    window_end_ms: float = Field(gt=0)
    site_ids: list[Id] = Field(min_length=1, max_length=10_000)
    presentations: list[UploadedPresentation] = Field(min_length=1, max_length=50_000)

    @model_validator(mode="after")
    def _window_ordered(self) -> UploadChunk:
        if self.window_end_ms <= self.window_start_ms:
            raise ValueError(
                f"window_end_ms {self.window_end_ms} must be after window_start_ms "
                f"{self.window_start_ms}"
            )
        return self


class UploadReceipt(WireModel):
    session_id: int
    chunk_sha256: Sha256
    n_presentations: int
    n_responses: int
    stored_at: dt.datetime
