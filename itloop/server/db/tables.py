"""Typed ORM tables for the whole domain of itloop.

Enumerations are stored as strings with CHECK constraints (portable between SQLite and
PostgreSQL, no native enum types to migrate). Times are timezone-aware UTC.
Acquisition times stay integer ticks (``*_ticks`` with their ``tick_rate_hz``).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

# The stored vocabularies are the wire protocol's (one definition each), re-exported here.
from itloop.protocol.auth import Role as Role
from itloop.protocol.auth import TokenKind as TokenKind
from itloop.protocol.batches import StimulusKind as StimulusKind
from itloop.protocol.jobs import JobState as JobState
from itloop.protocol.sessions import SessionState as SessionState

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; use an aware UTC time")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012
        dt.datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=24,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class IdempotencyState(enum.StrEnum):
    in_flight = "in_flight"
    done = "done"


class TimestampMixin:
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# --- people and credentials -------------------------------------------------------------


class User(TimestampMixin, Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    display_name: Mapped[str] = mapped_column(String(120), default="")
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    last_login_at: Mapped[dt.datetime | None]

    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", foreign_keys="ApiToken.user_id"
    )


class ApiToken(TimestampMixin, Base):
    """A Bearer token; only the SHA-256 of its secret part is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("kind <> 'rig' OR rig_id IS NOT NULL", name="rig_token_has_rig"),
        CheckConstraint("kind <> 'user' OR user_id IS NOT NULL", name="user_token_has_user"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    lookup: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    kind: Mapped[TokenKind] = mapped_column(_enum(TokenKind, "token_kind"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    rig_id: Mapped[int | None] = mapped_column(ForeignKey("rigs.id", ondelete="RESTRICT"))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]

    user: Mapped[User | None] = relationship(back_populates="tokens", foreign_keys=[user_id])
    rig: Mapped[Rig | None] = relationship(foreign_keys=[rig_id])


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_target", "target_type", "target_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    actor_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="SET NULL")
    )
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(64))
    target_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


# --- lab: rigs, subjects, arrays, sites, protocols --------------------------------------


class Rig(TimestampMixin, Base):
    __tablename__ = "rigs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    monitor_width_cm: Mapped[float | None] = mapped_column(Float)
    viewing_distance_cm: Mapped[float | None] = mapped_column(Float)
    resolution_w_px: Mapped[int | None]
    resolution_h_px: Mapped[int | None]
    refresh_rate_hz: Mapped[float | None] = mapped_column(Float)


class Subject(TimestampMixin, Base):
    __tablename__ = "subjects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    species: Mapped[str] = mapped_column(String(80), default="Macaca mulatta")
    sex: Mapped[str] = mapped_column(String(1), default="U")
    date_of_birth: Mapped[dt.date | None] = mapped_column(Date)
    notes: Mapped[str] = mapped_column(Text, default="")

    arrays: Mapped[list[ElectrodeArray]] = relationship(back_populates="subject")


class ElectrodeArray(TimestampMixin, Base):
    """A chronically implanted array (e.g. a 96-channel Utah array) in one subject."""

    __tablename__ = "arrays"
    __table_args__ = (
        UniqueConstraint("subject_id", "name"),
        CheckConstraint("n_channels > 0", name="positive_channels"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(80))
    region: Mapped[str] = mapped_column(String(80), default="IT")
    n_channels: Mapped[int] = mapped_column(Integer, default=96)
    serial: Mapped[str] = mapped_column(String(80), default="")
    implanted_on: Mapped[dt.date | None] = mapped_column(Date)

    subject: Mapped[Subject] = relationship(back_populates="arrays")
    sites: Mapped[list[RecordingSite]] = relationship(back_populates="array")


class RecordingSite(TimestampMixin, Base):
    """One multi-unit site: an electrode of an array and its acquisition channel id."""

    __tablename__ = "recording_sites"
    __table_args__ = (
        UniqueConstraint("array_id", "electrode"),
        UniqueConstraint("array_id", "acq_channel"),
        CheckConstraint("electrode >= 0", name="electrode_nonnegative"),
        CheckConstraint("acq_channel >= 0", name="acq_channel_nonnegative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    array_id: Mapped[int] = mapped_column(ForeignKey("arrays.id", ondelete="RESTRICT"))
    electrode: Mapped[int]
    acq_channel: Mapped[int]
    label: Mapped[str] = mapped_column(String(80), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    array: Mapped[ElectrodeArray] = relationship(back_populates="sites")


class Protocol(TimestampMixin, Base):
    """The experimental settings of a session: ε list, images, repeats, timing, window, controls."""

    __tablename__ = "protocols"
    __table_args__ = (
        CheckConstraint("images_per_site > 0", name="images_per_site_positive"),
        CheckConstraint("repeats >= 1", name="repeats_positive"),
        CheckConstraint("on_ms > 0 AND off_ms >= 0", name="timing_positive"),
        CheckConstraint("size_deg > 0", name="size_positive"),
        CheckConstraint(
            "window_start_ms >= 0 AND window_end_ms > window_start_ms", name="window_ordered"
        ),
        CheckConstraint("attack_steps > 0", name="attack_steps_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    eps_l2: Mapped[list[Any]] = mapped_column(default=list)
    images_per_site: Mapped[int] = mapped_column(Integer, default=42)
    repeats: Mapped[int] = mapped_column(Integer, default=2)
    on_ms: Mapped[float] = mapped_column(Float, default=100.0)
    off_ms: Mapped[float] = mapped_column(Float, default=100.0)
    size_deg: Mapped[float] = mapped_column(Float, default=8.0)
    window_start_ms: Mapped[float] = mapped_column(Float, default=70.0)
    window_end_ms: Mapped[float] = mapped_column(Float, default=170.0)
    controls: Mapped[list[Any]] = mapped_column(default=list)
    image_source: Mapped[str] = mapped_column(Text, default="")
    attack_steps: Mapped[int] = mapped_column(Integer, default=100)
    images_per_trial: Mapped[int] = mapped_column(Integer, default=8)
    min_partner_spacing_s: Mapped[float] = mapped_column(Float, default=0.0)
    allow_image_reuse: Mapped[bool] = mapped_column(Boolean, default=False)
    config_sha256: Mapped[str] = mapped_column(String(64), default="")


# --- sessions and models ----------------------------------------------------------------


class RecordingSession(TimestampMixin, Base):
    """One recording day of one subject on one rig; moves through ``SessionState``."""

    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_subject_scheduled", "subject_id", "scheduled_for"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="RESTRICT"))
    rig_id: Mapped[int] = mapped_column(ForeignKey("rigs.id", ondelete="RESTRICT"), index=True)
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id", ondelete="RESTRICT"))
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT")
    )
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    scheduled_for: Mapped[dt.datetime]
    state: Mapped[SessionState] = mapped_column(
        _enum(SessionState, "session_state"), default=SessionState.scheduled
    )
    state_changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    error: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str] = mapped_column(Text, default="")

    subject: Mapped[Subject] = relationship()
    rig: Mapped[Rig] = relationship()
    protocol: Mapped[Protocol] = relationship()
    sites: Mapped[list[SessionSite]] = relationship(
        back_populates="session", cascade="all, delete-orphan"
    )


class SessionSite(Base):
    """A site recorded (and attacked) in a session."""

    __tablename__ = "session_sites"

    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    site_id: Mapped[int] = mapped_column(
        ForeignKey("recording_sites.id", ondelete="RESTRICT"), primary_key=True
    )

    session: Mapped[RecordingSession] = relationship(back_populates="sites")
    site: Mapped[RecordingSite] = relationship()


class ModelVersion(TimestampMixin, Base):
    """An immutable fitted model of a subject's IT sites (rows are never updated)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="RESTRICT"))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT")
    )
    backbone: Mapped[str] = mapped_column(String(80))
    layer: Mapped[str] = mapped_column(String(80))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    training_data_fingerprint: Mapped[str] = mapped_column(String(64))
    n_trials: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    code_version: Mapped[str] = mapped_column(String(64), default="")

    parent: Mapped[ModelVersion | None] = relationship(remote_side="ModelVersion.id")
    sites: Mapped[list[ModelVersionSite]] = relationship(back_populates="model_version")


class ModelVersionSite(Base):
    """Which readout output of a model version predicts which recording site."""

    __tablename__ = "model_version_sites"
    __table_args__ = (UniqueConstraint("model_version_id", "readout_index"),)

    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    site_id: Mapped[int] = mapped_column(
        ForeignKey("recording_sites.id", ondelete="RESTRICT"), primary_key=True
    )
    readout_index: Mapped[int]
    heldout_r: Mapped[float | None] = mapped_column(Float)

    model_version: Mapped[ModelVersion] = relationship(back_populates="sites")


@event.listens_for(Session, "before_flush")
def _model_versions_are_immutable(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in session.dirty:
        if isinstance(obj, ModelVersion) and session.is_modified(obj, include_collections=False):
            raise ValueError(f"model version {obj.id} is immutable; fit a new version instead")


# --- images, stimuli, batches -----------------------------------------------------------


class Image(TimestampMixin, Base):
    """A content-addressed image file in the artifact store (8-bit PNG or the source file)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(200), default="")
    source_path: Mapped[str] = mapped_column(Text, default="")
    class_label: Mapped[str] = mapped_column(String(200), default="")
    width_px: Mapped[int]
    height_px: Mapped[int]
    media_type: Mapped[str] = mapped_column(String(40), default="image/png")


class Stimulus(TimestampMixin, Base):
    """An image shown in a session: a clean image or one derived from it at a budget ε."""

    __tablename__ = "stimuli"
    __table_args__ = (
        CheckConstraint(
            "(kind = 'clean' AND parent_id IS NULL AND eps_requested_l2 IS NULL) OR "
            "(kind <> 'clean' AND parent_id IS NOT NULL AND eps_requested_l2 IS NOT NULL "
            "AND eps_realised_l2 IS NOT NULL)",
            name="clean_or_derived",
        ),
        CheckConstraint(
            "kind <> 'attack' OR (site_id IS NOT NULL AND sign IS NOT NULL "
            "AND model_version_id IS NOT NULL AND predicted_clean IS NOT NULL "
            "AND predicted_perturbed IS NOT NULL)",
            name="attack_is_recorded",
        ),
        CheckConstraint("sign IS NULL OR sign IN (-1, 1)", name="sign_is_unit"),
        CheckConstraint(
            "eps_requested_l2 IS NULL OR eps_requested_l2 > 0", name="eps_requested_positive"
        ),
        CheckConstraint(
            "eps_realised_l2 IS NULL OR eps_realised_l2 >= 0", name="eps_realised_nonnegative"
        ),
        Index("ix_stimuli_session_kind", "session_id", "kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="RESTRICT"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"))
    kind: Mapped[StimulusKind] = mapped_column(_enum(StimulusKind, "stimulus_kind"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("stimuli.id", ondelete="RESTRICT"))
    site_id: Mapped[int | None] = mapped_column(
        ForeignKey("recording_sites.id", ondelete="RESTRICT")
    )
    eps_requested_l2: Mapped[float | None] = mapped_column(Float)
    eps_realised_l2: Mapped[float | None] = mapped_column(Float)
    sign: Mapped[int | None] = mapped_column(Integer)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT")
    )
    predicted_clean: Mapped[float | None] = mapped_column(Float)
    predicted_perturbed: Mapped[float | None] = mapped_column(Float)
    control_partner_image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="RESTRICT")
    )

    image: Mapped[Image] = relationship(foreign_keys=[image_id])
    parent: Mapped[Stimulus | None] = relationship(remote_side="Stimulus.id")


class Batch(TimestampMixin, Base):
    """The published set of stimuli and presentation plan of one session."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="RESTRICT"), unique=True
    )
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    n_stimuli: Mapped[int]
    n_presentations: Mapped[int]
    spare_event_codes: Mapped[list[Any]] = mapped_column(default=list)
    published_at: Mapped[dt.datetime | None]
    pulled_at: Mapped[dt.datetime | None]
    verified_at: Mapped[dt.datetime | None]


# --- what happened at the rig -----------------------------------------------------------


class Presentation(Base):
    """One planned (and, once uploaded, observed) showing of a stimulus."""

    __tablename__ = "presentations"
    __table_args__ = (
        UniqueConstraint("session_id", "seq"),
        UniqueConstraint("session_id", "event_code"),
        CheckConstraint("frame_drops >= 0", name="frame_drops_nonnegative"),
        CheckConstraint("tick_rate_hz IS NULL OR tick_rate_hz > 0", name="tick_rate_positive"),
        Index("ix_presentations_stimulus", "stimulus_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="RESTRICT"))
    stimulus_id: Mapped[int] = mapped_column(ForeignKey("stimuli.id", ondelete="RESTRICT"))
    seq: Mapped[int]
    trial_index: Mapped[int] = mapped_column(Integer, default=0)
    event_code: Mapped[int]
    onset_ticks: Mapped[int | None] = mapped_column(BigInteger)
    tick_rate_hz: Mapped[int | None]
    photodiode_delay_ticks: Mapped[int | None] = mapped_column(BigInteger)
    fixation_ok: Mapped[bool | None] = mapped_column(Boolean)
    frame_drops: Mapped[int] = mapped_column(Integer, default=0)
    valid: Mapped[bool | None] = mapped_column(Boolean)
    invalid_reason: Mapped[str | None] = mapped_column(String(200))
    uploaded_at: Mapped[dt.datetime | None]


class Response(Base):
    """The spike counts of every site of a session after one onset, in [start, end).

    ``counts`` packs one little-endian int32 per site, in the order of the session's sites by
    ascending site id (``session_sites``): a session is a dense presentation × site matrix, and
    one row per presentation keeps a 5-hour upload (20,000 × 192) to 20,000 rows.
    """

    __tablename__ = "responses"
    __table_args__ = (
        CheckConstraint("n_sites > 0", name="n_sites_positive"),
        CheckConstraint("window_end_ms > window_start_ms", name="window_ordered"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    presentation_id: Mapped[int] = mapped_column(
        ForeignKey("presentations.id", ondelete="RESTRICT"), unique=True
    )
    n_sites: Mapped[int]
    counts: Mapped[bytes] = mapped_column(LargeBinary)
    window_start_ms: Mapped[float] = mapped_column(Float)
    window_end_ms: Mapped[float] = mapped_column(Float)
    complete: Mapped[bool] = mapped_column(Boolean, default=True)


class IdempotencyRecord(TimestampMixin, Base):
    """A request made with an ``Idempotency-Key``: its body hash and the stored answer."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("scope", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(120))
    key: Mapped[str] = mapped_column(String(200))
    request_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[IdempotencyState] = mapped_column(_enum(IdempotencyState, "idempotency_state"))
    status_code: Mapped[int | None]
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)


# --- jobs and analyses ------------------------------------------------------------------


class Job(TimestampMixin, Base):
    """A durable job (a DBOS workflow) as users see it: kind, state, progress, error."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_fraction"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.queued)
    workflow_id: Mapped[str] = mapped_column(String(120), unique=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id", ondelete="SET NULL"))
    subject_id: Mapped[int | None] = mapped_column(ForeignKey("subjects.id", ondelete="SET NULL"))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Analysis(TimestampMixin, Base):
    """One run of an estimator over stored data, with everything that produced it."""

    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="RESTRICT"))
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id", ondelete="RESTRICT"))
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT")
    )
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    inputs_sha256: Mapped[str] = mapped_column(String(64))
    code_version: Mapped[str] = mapped_column(String(64), default="")
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)


class SensitivityResult(Base):
    """The normalised sign-corrected lower bound of one site at one ε for one stimulus kind."""

    __tablename__ = "sensitivity_results"
    __table_args__ = (
        UniqueConstraint("analysis_id", "site_id", "eps_l2", "kind"),
        CheckConstraint("n_images >= 0", name="n_images_nonnegative"),
        Index("ix_sensitivity_results_site_day", "site_id", "day"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"))
    site_id: Mapped[int] = mapped_column(ForeignKey("recording_sites.id", ondelete="RESTRICT"))
    day: Mapped[dt.date] = mapped_column(Date)
    eps_l2: Mapped[float] = mapped_column(Float)
    kind: Mapped[StimulusKind] = mapped_column(_enum(StimulusKind, "result_kind"))
    n_images: Mapped[int]
    lower_bound: Mapped[float] = mapped_column(Float)
    lower_bound_normalised: Mapped[float] = mapped_column(Float)
    ci_low: Mapped[float] = mapped_column(Float)
    ci_high: Mapped[float] = mapped_column(Float)
    sigma_clean: Mapped[float] = mapped_column(Float)
    naive_abs_normalised: Mapped[float] = mapped_column(Float)
    rms_normalised: Mapped[float] = mapped_column(Float)
