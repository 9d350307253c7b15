"""Stimulus batches: atomic publication of a generated session and the manifest the rig pulls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop.protocol.batches import (
    BatchManifest,
    ManifestSite,
    ManifestStimulus,
    PlannedPresentation,
    PresentationTiming,
    manifest_digest,
)
from itloop.protocol.batches import StimulusKind as WireKind
from itloop.server import audit
from itloop.server.artifacts import ContentStore
from itloop.server.auth import Principal
from itloop.server.db.tables import (
    Batch,
    ElectrodeArray,
    Image,
    Presentation,
    RecordingSession,
    RecordingSite,
    SessionSite,
    SessionState,
    Stimulus,
    StimulusKind,
    Subject,
    utcnow,
)
from itloop.server.errors import Conflict, InvalidInput, NotFound
from itloop.server.sessions import transition


@dataclass(frozen=True)
class NewImage:
    sha256: str
    width_px: int
    height_px: int
    source: str = "generated"
    source_path: str = ""
    class_label: str = ""


@dataclass(frozen=True)
class NewStimulus:
    """A generated stimulus; ``key`` names it within the batch (parents refer to keys)."""

    key: str
    image_sha256: str
    kind: StimulusKind
    parent_key: str | None = None
    site_id: int | None = None
    eps_requested_l2: float | None = None
    eps_realised_l2: float | None = None
    sign: int | None = None
    model_version_id: int | None = None
    predicted_clean: float | None = None
    predicted_perturbed: float | None = None
    partner_image_sha256: str | None = None


@dataclass(frozen=True)
class NewPresentation:
    seq: int
    stimulus_key: str
    event_code: int
    trial_index: int


def publish_batch(
    db: Session,
    session: RecordingSession,
    *,
    images: Sequence[NewImage],
    stimuli: Sequence[NewStimulus],
    plan: Sequence[NewPresentation],
    spare_event_codes: Sequence[int],
    store: ContentStore,
    actor: Principal | None = None,
) -> Batch:
    """Insert the whole batch and make it visible in one transaction (the caller commits)."""
    if db.scalar(select(Batch.id).where(Batch.session_id == session.id)) is not None:
        raise Conflict(f"session {session.id} already has a batch", field="session_id")
    for image in images:
        if image.sha256 not in store:
            raise InvalidInput(
                f"image {image.sha256} is not in the artifact store", value=image.sha256
            )
    image_ids: dict[str, int] = {}
    for image in images:
        existing = db.scalar(select(Image).where(Image.sha256 == image.sha256))
        if existing is None:
            existing = Image(
                sha256=image.sha256,
                width_px=image.width_px,
                height_px=image.height_px,
                source=image.source,
                source_path=image.source_path,
                class_label=image.class_label,
            )
            db.add(existing)
            db.flush()
        image_ids[image.sha256] = existing.id
    stimulus_ids: dict[str, int] = {}
    for item in sorted(stimuli, key=lambda s: s.parent_key is not None):
        if item.key in stimulus_ids:
            raise InvalidInput(f"stimulus key {item.key!r} is used twice", value=item.key)
        if item.image_sha256 not in image_ids:
            raise InvalidInput(f"stimulus {item.key!r} names an unknown image", value=item.key)
        parent_id = None
        if item.parent_key is not None:
            if item.parent_key not in stimulus_ids:
                raise InvalidInput(
                    f"stimulus {item.key!r} derives from unknown {item.parent_key!r}",
                    value=item.parent_key,
                )
            parent_id = stimulus_ids[item.parent_key]
        row = Stimulus(
            session_id=session.id,
            image_id=image_ids[item.image_sha256],
            kind=item.kind,
            parent_id=parent_id,
            site_id=item.site_id,
            eps_requested_l2=item.eps_requested_l2,
            eps_realised_l2=item.eps_realised_l2,
            sign=item.sign,
            model_version_id=item.model_version_id,
            predicted_clean=item.predicted_clean,
            predicted_perturbed=item.predicted_perturbed,
            control_partner_image_id=image_ids.get(item.partner_image_sha256 or ""),
        )
        db.add(row)
        db.flush()
        stimulus_ids[item.key] = row.id
    codes = [p.event_code for p in plan] + list(spare_event_codes)
    if len(set(codes)) != len(codes):
        raise InvalidInput("event codes of the plan and the spare codes must all differ")
    for p in plan:
        if p.stimulus_key not in stimulus_ids:
            raise InvalidInput(f"presentation {p.seq} names unknown stimulus {p.stimulus_key!r}")
    db.add_all(
        Presentation(
            session_id=session.id,
            stimulus_id=stimulus_ids[p.stimulus_key],
            seq=p.seq,
            trial_index=p.trial_index,
            event_code=p.event_code,
        )
        for p in plan
    )
    db.flush()
    batch = Batch(
        session_id=session.id,
        manifest_sha256="0" * 64,
        n_stimuli=len(stimuli),
        n_presentations=len(plan),
        spare_event_codes=list(spare_event_codes),
        published_at=utcnow(),
    )
    db.add(batch)
    db.flush()
    batch.manifest_sha256 = build_manifest(db, session, batch, store).manifest_sha256
    transition(db, session, SessionState.ready, actor=actor)
    audit.record(db, actor, "batch.publish", "session", session.id, stimuli=len(stimuli))
    return batch


def build_manifest(
    db: Session,
    session: RecordingSession,
    batch: Batch,
    store: ContentStore,
) -> BatchManifest:
    if batch.published_at is None:
        raise NotFound(f"session {session.id} has no published batch yet", field="session_id")
    protocol = session.protocol
    subject = db.get(Subject, session.subject_id)
    sites = db.execute(
        select(RecordingSite, ElectrodeArray.name)
        .join(SessionSite, SessionSite.site_id == RecordingSite.id)
        .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
        .where(SessionSite.session_id == session.id)
        .order_by(RecordingSite.id)
    ).all()
    stimuli = db.execute(
        select(Stimulus.id, Stimulus.kind, Image.sha256, Image.width_px, Image.height_px)
        .join(Image, Image.id == Stimulus.image_id)
        .where(Stimulus.session_id == session.id)
        .order_by(Stimulus.id)
    ).all()
    presentations = db.execute(
        select(
            Presentation.seq,
            Presentation.stimulus_id,
            Presentation.event_code,
            Presentation.trial_index,
        )
        .where(Presentation.session_id == session.id, Presentation.seq < batch.n_presentations)
        .order_by(Presentation.seq)
    ).all()
    content = {
        "session_id": session.id,
        "rig_id": session.rig_id,
        "subject": subject.name if subject else "",
        "published_at": batch.published_at,
        "timing": PresentationTiming(
            on_ms=protocol.on_ms,
            off_ms=protocol.off_ms,
            size_deg=protocol.size_deg,
            images_per_trial=protocol.images_per_trial,
        ),
        "window_start_ms": protocol.window_start_ms,
        "window_end_ms": protocol.window_end_ms,
        "spare_event_codes": [int(c) for c in batch.spare_event_codes],
        "sites": [
            ManifestSite(
                site_id=site.id, acq_channel=site.acq_channel, array=array, electrode=site.electrode
            )
            for site, array in sites
        ],
        "stimuli": [
            ManifestStimulus(
                stimulus_id=sid,
                sha256=sha,
                size_bytes=store.existing(sha).stat().st_size,
                width_px=w,
                height_px=h,
                kind=WireKind(kind.value),
            )
            for sid, kind, sha, w, h in stimuli
        ],
        "presentations": [
            PlannedPresentation(seq=seq, stimulus_id=sid, event_code=code, trial_index=trial)
            for seq, sid, code, trial in presentations
        ],
    }
    draft = BatchManifest.model_validate({**content, "manifest_sha256": "0" * 64})
    digest = manifest_digest(draft.model_dump(mode="json", exclude={"manifest_sha256"}))
    return draft.model_copy(update={"manifest_sha256": digest})


def published_batch(db: Session, session: RecordingSession) -> Batch:
    batch = db.scalar(select(Batch).where(Batch.session_id == session.id))
    if batch is None or batch.published_at is None:
        raise NotFound(
            f"session {session.id} has no published batch yet", field="session_id", value=session.id
        )
    return batch
