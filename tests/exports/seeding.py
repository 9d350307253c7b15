"""A small lab with recorded, analysed days: sessions, batches, uploaded counts, results.

Sensitivity results are constructed (not estimated) so that the figures have known shapes:
the attack bound rises with ε and over days, the controls stay below it.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from itloop.server.artifacts import ContentStore
from itloop.server.auth import Principal
from itloop.server.batches import NewImage, NewPresentation, NewStimulus, publish_batch
from itloop.server.db.tables import (
    Analysis,
    ElectrodeArray,
    ModelVersion,
    ModelVersionSite,
    Presentation,
    Protocol,
    RecordingSite,
    Response,
    Rig,
    Role,
    SensitivityResult,
    SessionState,
    StimulusKind,
    Subject,
    TokenKind,
    utcnow,
)
from itloop.server.sessions import schedule, transition
from itloop.server.uploads import pack_counts

STAFF = Principal(kind=TokenKind.user, user_id=None, role=Role.staff)
EPS = (0.5, 1.0, 2.0, 4.0)
TICKS_HZ = 30_000


@dataclass
class SeededLab:
    subject_id: int
    rig_id: int
    protocol_id: int
    site_ids: list[int]
    session_ids: list[int] = field(default_factory=list)
    model_version_ids: list[int] = field(default_factory=list)
    days: list[dt.date] = field(default_factory=list)


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def seed_lab(
    sessions: sessionmaker[Session],
    store: ContentStore,
    *,
    n_days: int = 3,
    n_sites: int = 3,
    images_per_site: int = 4,
    repeats: int = 2,
    first_day: dt.date = dt.date(2026, 11, 2),
    subject_name: str = "M1",
    rig_name: str = "rig-1",
) -> SeededLab:
    """``n_days`` analysed sessions of one subject, each with uploads and constructed results."""
    rng = np.random.default_rng(7)
    with sessions() as db:
        subject = Subject(name=subject_name, sex="M", date_of_birth=dt.date(2015, 4, 1))
        rig = Rig(name=rig_name, refresh_rate_hz=120.0)
        protocol = Protocol(
            name=f"paper-{subject_name}",
            eps_l2=list(EPS),
            images_per_site=images_per_site,
            repeats=repeats,
            controls=["noise", "interpolation"],
            images_per_trial=4,
        )
        db.add_all([subject, rig, protocol])
        db.flush()
        array = ElectrodeArray(subject_id=subject.id, name="aIT", n_channels=96, serial="U-1")
        db.add(array)
        db.flush()
        sites = [
            RecordingSite(array_id=array.id, electrode=i, acq_channel=i + 1, label=f"aIT-{i}")
            for i in range(n_sites)
        ]
        db.add_all(sites)
        db.flush()
        lab = SeededLab(subject.id, rig.id, protocol.id, [s.id for s in sites])
        parent: ModelVersion | None = None
        for day_index in range(n_days):
            model = ModelVersion(
                subject_id=subject.id,
                parent_id=parent.id if parent else None,
                backbone="resnet50",
                layer="layer4.0",
                checkpoint_sha256=f"{day_index:064x}",
                training_data_fingerprint=f"{day_index + 100:064x}",
                n_trials=day_index * 200,
                config={"input_px": 16},
            )
            db.add(model)
            db.flush()
            db.add_all(
                ModelVersionSite(
                    model_version_id=model.id,
                    site_id=site.id,
                    readout_index=k,
                    heldout_r=None if day_index == 0 else 0.3 + 0.1 * day_index + 0.02 * k,
                )
                for k, site in enumerate(sites)
            )
            db.flush()
            lab.model_version_ids.append(model.id)
            parent = model
            day = first_day + dt.timedelta(days=day_index)
            lab.days.append(day)
            session = schedule(
                db,
                subject_id=subject.id,
                rig_id=rig.id,
                protocol_id=protocol.id,
                scheduled_for=dt.datetime.combine(day, dt.time(9), tzinfo=dt.UTC),
                site_ids=None,
                notes=f"day {day_index}",
                actor=STAFF,
            )
            session.model_version_id = model.id
            db.flush()
            _record(db, store, session.id, lab, model.id, day_index, rng, repeats)
            _results(db, session.id, lab, model.id, day, day_index)
            lab.session_ids.append(session.id)
        db.commit()
    return lab


def _record(
    db: Session,
    store: ContentStore,
    session_id: int,
    lab: SeededLab,
    model_id: int,
    day_index: int,
    rng: np.random.Generator,
    repeats: int,
) -> None:
    from itloop.server.db.tables import RecordingSession

    session = db.get(RecordingSession, session_id)
    assert session is not None
    protocol = db.get(Protocol, lab.protocol_id)
    assert protocol is not None
    transition(db, session, SessionState.generating, actor=None)
    images: dict[str, NewImage] = {}
    stimuli: list[NewStimulus] = []
    base = 10_000 * (session_id + 1)
    for k, site in enumerate(lab.site_ids):
        for i in range(protocol.images_per_site):
            clean_key = f"c{site}:{i}"
            sha = store.put(png(base + 100 * k + i))
            images[sha] = NewImage(sha, 16, 16, source="test", class_label=f"class{i}")
            stimuli.append(NewStimulus(clean_key, sha, StimulusKind.clean, site_id=site))
            for e, eps in enumerate(EPS):
                for kind in (StimulusKind.attack, StimulusKind.noise, StimulusKind.interpolation):
                    sha = store.put(png(base + 100 * k + i + 1000 * (e + 1) + 37 * len(kind)))
                    images[sha] = NewImage(sha, 16, 16)
                    sign = 1 if (i + e) % 2 == 0 else -1
                    stimuli.append(
                        NewStimulus(
                            f"{kind.value[0]}{site}:{i}:{eps}",
                            sha,
                            kind,
                            parent_key=clean_key,
                            site_id=site,
                            eps_requested_l2=eps,
                            eps_realised_l2=eps * 0.98,
                            sign=sign if kind is StimulusKind.attack else None,
                            model_version_id=model_id,
                            predicted_clean=5.0,
                            predicted_perturbed=5.0 + sign * eps,
                        )
                    )
    keys = [s.key for s in stimuli] * repeats
    order = np.random.default_rng(session_id).permutation(len(keys))
    plan = [
        NewPresentation(seq, keys[j], 1 + seq, seq // protocol.images_per_trial)
        for seq, j in enumerate(order.tolist())
    ]
    publish_batch(
        db,
        session,
        images=list(images.values()),
        stimuli=stimuli,
        plan=plan,
        spare_event_codes=[60_000 + i for i in range(4)],
        store=store,
    )
    transition(db, session, SessionState.running, actor=None)
    _upload(db, session_id, lab, rng)
    transition(db, session, SessionState.uploaded, actor=None)
    transition(db, session, SessionState.analysed, actor=None)
    db.flush()


def _upload(db: Session, session_id: int, lab: SeededLab, rng: np.random.Generator) -> None:
    """Counts with a site- and stimulus-dependent rate; a few broken fixations and drops."""
    from sqlalchemy import select

    rows = db.execute(
        select(Presentation.id, Presentation.seq, Presentation.stimulus_id)
        .where(Presentation.session_id == session_id)
        .order_by(Presentation.seq)
    ).all()
    now = utcnow()
    n_sites = len(lab.site_ids)
    updates, responses = [], []
    for pid, seq, stimulus_id in rows:
        fixated = seq % 17 != 5
        drops = 1 if seq % 23 == 3 else 0
        updates.append(
            {
                "id": pid,
                "onset_ticks": TICKS_HZ + 6_000 * seq,
                "tick_rate_hz": TICKS_HZ,
                "fixation_ok": fixated,
                "frame_drops": drops,
                "valid": fixated,
                "invalid_reason": None if fixated else "fixation lost",
                "uploaded_at": now,
            }
        )
        rate = 4.0 + (stimulus_id % 7) + np.arange(n_sites)
        counts = rng.poisson(rate).astype(int).tolist()
        responses.append(
            {
                "presentation_id": pid,
                "n_sites": n_sites,
                "counts": pack_counts(counts),
                "window_start_ms": 70.0,
                "window_end_ms": 170.0,
                "complete": seq % 41 != 7,
            }
        )
    db.execute(update(Presentation), updates)
    db.execute(Response.__table__.insert(), responses)


def _results(
    db: Session, session_id: int, lab: SeededLab, model_id: int, day: dt.date, day_index: int
) -> None:
    analysis = Analysis(
        kind="sensitivity",
        subject_id=lab.subject_id,
        session_id=session_id,
        model_version_id=model_id,
        inputs_sha256=f"{session_id:064x}",
        config={"constructed": True},
    )
    db.add(analysis)
    db.flush()
    for k, site in enumerate(lab.site_ids):
        for eps in EPS:
            attack = (0.15 + 0.1 * day_index) * np.log2(1 + eps) * (1 + 0.1 * k)
            for kind, value in (
                (StimulusKind.attack, attack),
                (StimulusKind.noise, 0.05 * eps),
                (StimulusKind.interpolation, 0.08 * eps),
            ):
                db.add(
                    SensitivityResult(
                        analysis_id=analysis.id,
                        site_id=site,
                        day=day,
                        eps_l2=eps,
                        kind=kind,
                        n_images=4,
                        lower_bound=value * 2.0,
                        lower_bound_normalised=float(value),
                        ci_low=float(value) - 0.1,
                        ci_high=float(value) + 0.1,
                        sigma_clean=2.0,
                        naive_abs_normalised=float(value) + 0.4,
                        rms_normalised=float(value) + 0.5,
                    )
                )
    db.flush()
