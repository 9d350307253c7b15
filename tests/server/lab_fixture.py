"""A small lab in the database: a subject with sites, a rig, a protocol, a published batch."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from itloop.server.artifacts import ContentStore
from itloop.server.batches import NewImage, NewPresentation, NewStimulus, publish_batch
from itloop.server.db.tables import ModelVersion, Protocol, Rig, SessionState, StimulusKind
from itloop.server.sessions import transition

from .conftest import Server
from .lab_setup import add_subject_with_sites, schedule_every_site


@dataclass
class Lab:
    subject_id: int
    rig_id: int
    protocol_id: int
    site_ids: list[int]
    session_id: int
    stimulus_ids: list[int]
    image_sha256: list[str]
    n_planned: int
    spare_codes: list[int]


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_lab(server: Server, *, n_sites: int = 3, n_images: int = 2, publish: bool = True) -> Lab:
    store = ContentStore(server.settings.artifact_dir)
    with server.sessions() as db:
        rig = Rig(name="rig-1")
        protocol = Protocol(name="paper", eps_l2=[1.0, 2.0], images_per_trial=4)
        db.add_all([rig, protocol])
        db.flush()
        subject, sites = add_subject_with_sites(db, n_sites)
        model = ModelVersion(
            subject_id=subject.id,
            backbone="tiny",
            layer="features",
            checkpoint_sha256="a" * 64,
            training_data_fingerprint="b" * 64,
        )
        db.add(model)
        db.flush()
        session = schedule_every_site(db, subject.id, rig.id, protocol.id)
        db.commit()
        lab = Lab(subject.id, rig.id, protocol.id, [s.id for s in sites], session.id, [], [], 0, [])
        if not publish:
            return lab
        transition(db, session, SessionState.generating, actor=None)
        images, stimuli = [], []
        for i in range(n_images):
            clean_sha = store.put(png(100 + i))
            adv_sha = store.put(png(200 + i))
            images += [NewImage(clean_sha, 16, 16), NewImage(adv_sha, 16, 16)]
            stimuli.append(NewStimulus(f"c{i}", clean_sha, StimulusKind.clean))
            stimuli.append(
                NewStimulus(
                    f"a{i}",
                    adv_sha,
                    StimulusKind.attack,
                    parent_key=f"c{i}",
                    site_id=lab.site_ids[i % n_sites],
                    eps_requested_l2=1.0,
                    eps_realised_l2=0.99,
                    sign=1,
                    model_version_id=model.id,
                    predicted_clean=3.0,
                    predicted_perturbed=5.0,
                )
            )
        keys = [s.key for s in stimuli] * 2
        plan = [NewPresentation(seq, key, 100 + seq, seq // 4) for seq, key in enumerate(keys)]
        spare = [100 + len(plan) + i for i in range(8)]
        publish_batch(
            db,
            session,
            images=images,
            stimuli=stimuli,
            plan=plan,
            spare_event_codes=spare,
            store=store,
        )
        db.commit()
        from sqlalchemy import select

        from itloop.server.db.tables import Presentation

        order = (
            db.execute(
                select(Presentation.stimulus_id)
                .where(Presentation.session_id == session.id)
                .order_by(Presentation.seq)
            )
            .scalars()
            .all()
        )
        lab.stimulus_ids = list(order)
        lab.image_sha256 = [i.sha256 for i in images]
        lab.n_planned = len(plan)
        lab.spare_codes = spare
        return lab
