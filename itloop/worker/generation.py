"""The generation job: a session's attack and control stimuli, its RSVP plan, one publication.

Steps (each durable; a killed worker resumes after the last finished one):

1. ``prepare``: the generating model (the session's, or the subject's day-0 model), new clean
   images from the protocol's image source (none already shown to the subject), assigned to
   sites; the session moves to ``generating``.
2. ``attack`` per chunk of sites: PGD on the generating model for every image × ε × sign, the
   larger predicted change kept, quantised to 8 bits within ε; the Gaussian-noise and
   interpolation controls at the same ε; every PNG written to the content store (idempotent),
   with the generating model's f(x) and f(x + δ) on the quantised images.
3. ``publish``: the RSVP plan and the whole batch in one transaction (``ready``); a batch that
   exists already is returned as it is, so a batch is published once.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from dbos import DBOS
from sqlalchemy import select

from itloop.protocol.jobs import JobKind
from itloop.server.artifacts import ContentStore
from itloop.server.batches import NewImage, NewPresentation, NewStimulus, publish_batch
from itloop.server.db.tables import (
    Batch,
    Image,
    ModelVersion,
    Protocol,
    RecordingSession,
    SessionSite,
    SessionState,
    Stimulus,
    StimulusKind,
)
from itloop.server.sessions import transition
from itloop.stimulus.attacks import AttackConfig, AttackEngine, AttackRows
from itloop.stimulus.controls import gaussian_noise_control, interpolation_control
from itloop.stimulus.images import load_image
from itloop.stimulus.pipeline import KeptStimuli, PngWriter, attack_and_store, day_chunks
from itloop.stimulus.quantisation import from_levels, to_levels
from itloop.stimulus.rsvp import StimulusSlot, gap_in_presentations, plan_rsvp
from itloop.stimulus.sources import ImageFolderSource
from itloop.worker import ranks, runtime
from itloop.worker.modelstore import create_day0_version, load_model_files, site_order
from itloop.worker.workflows import JobRun, job_workflow

__all__ = ["follow_attack", "generate", "resolve_device"]

log = logging.getLogger(__name__)

_LEGACY_SITES_PER_CHUNK = 8  # chunks of a plan recorded before chunks were ranges of pairs
CONTROL_KINDS = {"noise": StimulusKind.noise, "interpolation": StimulusKind.interpolation}


def resolve_device(name: str) -> torch.device:
    """The device of ``Settings.device``: a rank's own when the worker has several."""
    rank = ranks.current()
    if rank is not None:
        return rank.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _store() -> ContentStore:
    return ContentStore(runtime.current().settings.artifact_dir)


def _session_seed(session_id: int) -> int:
    return 0x5EED_0000 + session_id


@DBOS.step(name="itloop.generate.prepare")
def _prepare(session_id: int) -> dict[str, Any]:
    rt = runtime.current()
    store = _store()
    with rt.sessions() as db:
        session = db.get(RecordingSession, session_id)
        if session is None:
            raise ValueError(f"session {session_id} does not exist")
        protocol = db.get(Protocol, session.protocol_id)
        if protocol is None:
            raise ValueError(f"session {session_id} names no protocol")
        if session.state is SessionState.scheduled:
            transition(db, session, SessionState.generating, actor=None)
        elif session.state is not SessionState.generating:
            raise ValueError(
                f"session {session_id} is {session.state.value!r}; only a scheduled session "
                "is generated"
            )
        if session.model_version_id is None:
            day0 = create_day0_version(
                db, store, rt.settings, session.subject_id, seed=_session_seed(session_id)
            )
            session.model_version_id = day0.id
        found = db.get(ModelVersion, session.model_version_id)
        if found is None:
            raise ValueError(f"model version {session.model_version_id} does not exist")
        version = found
        readout = {site: i for i, site in enumerate(site_order(db, version))}
        sites = sorted(
            db.scalars(select(SessionSite.site_id).where(SessionSite.session_id == session_id))
        )
        missing = [s for s in sites if s not in readout]
        if missing:
            raise ValueError(
                f"model version {version.id} has no readout for sites {missing}; refit first"
            )
        if not protocol.image_source:
            raise ValueError(f"protocol {protocol.name!r} has no image_source folder")
        source = ImageFolderSource(_resolve_source(protocol.image_source))
        shown = set()
        if not protocol.allow_image_reuse:
            shown = set(
                db.scalars(
                    select(Image.source_path)
                    .join(Stimulus, Stimulus.image_id == Image.id)
                    .join(RecordingSession, RecordingSession.id == Stimulus.session_id)
                    .where(
                        RecordingSession.subject_id == session.subject_id,
                        Stimulus.kind == StimulusKind.clean,
                        Image.source == _source_name(protocol.image_source),
                    )
                )
            )
        n_images = protocol.images_per_site * len(sites)
        chosen = source.sample(n_images, exclude=shown, seed=_session_seed(session_id))
        assignments = []
        for k, image in enumerate(chosen):
            site = sites[k % len(sites)]
            partner = source.partner_for(image, seed=_session_seed(session_id) + k)
            assignments.append(
                {
                    "site_id": site,
                    "readout_index": readout[site],
                    "path": str(image.path),
                    "relative_path": image.relative_path,
                    "class_label": image.class_label,
                    "partner_path": str(partner.path),
                }
            )
        eps_l2 = [float(e) for e in protocol.eps_l2]
        batch = AttackConfig.for_device(resolve_device(rt.settings.device)).batch_size
        db.commit()
        return {
            "session_id": session_id,
            "model_version_id": version.id,
            "eps_l2": eps_l2,
            "controls": [c for c in protocol.controls if c in CONTROL_KINDS],
            "steps": protocol.attack_steps,
            "input_px": int(version.config["input_px"]),
            "source": _source_name(protocol.image_source),
            "sites": sites,
            "assignments": assignments,
            # one durable step per range of assignments, each a whole number of batches of the
            # assignments' rows (each ε, both signs)
            "chunks": day_chunks(
                len(assignments), len(eps_l2) * 2, batch, rt.settings.generation_chunk_rows
            ),
            "seed": _session_seed(session_id),
        }


def _resolve_source(image_source: str) -> Path:
    return Path(image_source).expanduser()


def _source_name(image_source: str) -> str:
    return f"folder:{image_source}"[:200]


_ENGINE: list[AttackEngine] = []  # the last engine built in this process


def _engine(task: dict[str, Any], device: torch.device, store: ContentStore) -> AttackEngine:
    """The attack engine of the task's model version, reused while the model and settings stay
    the same, so that the compiled loop is built once for all chunks of a day, not once per
    chunk."""
    model = load_model_files(store, task["checkpoint_sha256"], task["card"], device)
    config = AttackConfig.for_device(device, task["steps"])
    if not (_ENGINE and _ENGINE[0].model is model and _ENGINE[0].config == config):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: the padded batch of 512
        _ENGINE[:] = [AttackEngine(model, config)]
    return _ENGINE[0]


def _chunk_count(plan: dict[str, Any]) -> int:
    """Durable attack steps of a plan (see :func:`_chunk_work`)."""
    if "chunks" not in plan:
        return math.ceil(len(plan["sites"]) / _LEGACY_SITES_PER_CHUNK)
    return len(plan["chunks"])


def _chunk_work(plan: dict[str, Any], chunk: int) -> list[dict[str, Any]]:
    """The assignments (image, site) of a chunk: a range of the plan's, or, in a plan recorded
    before chunks were ranges, those of 8 sites."""
    if "chunks" not in plan:
        first = chunk * _LEGACY_SITES_PER_CHUNK
        sites = set(plan["sites"][first : first + _LEGACY_SITES_PER_CHUNK])
        return [a for a in plan["assignments"] if a["site_id"] in sites]
    start, end = plan["chunks"][chunk]
    return list(plan["assignments"][start:end])


def _attack_task(plan: dict[str, Any], chunk: int, work: list[dict[str, Any]]) -> dict[str, Any]:
    """What every rank needs to attack the chunk: plain data, sent to the other ranks."""
    with runtime.current().sessions() as db:
        version = db.get(ModelVersion, plan["model_version_id"])
        if version is None:
            raise ValueError(f"model version {plan['model_version_id']} vanished")
        checkpoint, card = version.checkpoint_sha256, version.config["card"]
    return {
        "kind": "attack",
        "artifact_dir": str(runtime.current().settings.artifact_dir),
        "checkpoint_sha256": checkpoint,
        "card": card,
        "steps": plan["steps"],
        "input_px": plan["input_px"],
        "eps_l2": plan["eps_l2"],
        "paths": [a["path"] for a in work],
        "readout_index": [a["readout_index"] for a in work],
        "seed": plan["seed"] * 1000 + chunk,
    }


def _clean_levels(task: dict[str, Any]) -> torch.Tensor:
    px = task["input_px"]
    return to_levels(torch.stack([load_image(p, size_hw=(px, px)) for p in task["paths"]]))


def _attack_rows(
    task: dict[str, Any],
    writer: PngWriter,
    device: torch.device,
    store: ContentStore,
    clean_levels: torch.Tensor | None = None,
) -> tuple[AttackEngine, KeptStimuli]:
    """Load the task's clean images (unless given) and model, then attack its rows: this rank's
    shard when the worker has several ranks (rank 0 then gets every kept row), each rank's
    stimuli to its ``writer``."""
    levels, engine, problem = clean_levels, None, None
    try:
        if levels is None:
            levels = _clean_levels(task)
        engine = _engine(task, device, store)
    except Exception as exc:  # every rank learns of it before any collective starts
        problem = exc
    failed = ranks.not_ready(problem is None)
    if problem is not None:
        raise problem
    if failed or levels is None or engine is None:
        raise RuntimeError(
            f"ranks {failed} could not load the chunk's images or model (see their logs)"
        )
    readout = torch.tensor(task["readout_index"], dtype=torch.int64)
    rows = AttackRows.grid(torch.arange(len(task["paths"])), readout, task["eps_l2"])
    generator = torch.Generator(device="cpu").manual_seed(task["seed"])
    kept = attack_and_store(engine, levels, rows, generator=generator, writer=writer, device=device)
    return engine, kept


def follow_attack(task: dict[str, Any]) -> None:
    """A chunk's attack on a rank after the first: this rank's shard, its PNGs stored (before
    :func:`attack_and_store` sends rank 0 their addresses)."""
    rank = ranks.current()
    if rank is None:
        raise RuntimeError("follow_attack runs on a worker's ranks")
    store = ContentStore(Path(task["artifact_dir"]))
    with PngWriter(store.put) as writer:
        _, kept = _attack_rows(task, writer, rank.device, store)
    log.info("rank %d: %d stimuli of its shard stored", rank.rank, len(kept.result))


@DBOS.step(name="itloop.generate.attack")
def _attack(plan: dict[str, Any], chunk: int) -> list[dict[str, Any]]:
    """Stimuli of the chunk's (image, site) pairs: metadata per stimulus (the PNGs go to the
    store). With several ranks, every rank attacks its shard of the chunk's rows."""
    rt = runtime.current()
    store = _store()
    device = resolve_device(rt.settings.device)
    work = _chunk_work(plan, chunk)
    if not work:
        return []
    px = plan["input_px"]
    task = _attack_task(plan, chunk, work)
    readout = torch.tensor(task["readout_index"], dtype=torch.int64)
    # PNGs are encoded and stored on CPU threads while the device attacks the next batch
    clean_levels = _clean_levels(task)  # before the other ranks are called
    with PngWriter(store.put) as writer:
        clean_at = writer.submit(list(clean_levels))
        with ranks.leading(task):
            engine, kept = _attack_rows(task, writer, device, store, clean_levels)
        result = kept.result
        f_clean_all = torch.full((len(work),), float("nan"))  # f(x) at its site, from the run
        f_clean_all[result.image_index] = result.f_clean
        controls = _controls(
            plan, work, clean_levels, f_clean_all, engine, readout, writer, chunk, device
        )
        sha = writer.results()

    out: list[dict[str, Any]] = []
    for i, a in enumerate(work):
        out.append(
            {
                "key": f"c{a['site_id']}:{a['relative_path']}",
                "kind": "clean",
                "sha256": sha[clean_at[i]],
                "px": px,
                "site_id": a["site_id"],
                "relative_path": a["relative_path"],
                "class_label": a["class_label"],
                "f_clean": float(f_clean_all[i]),
            }
        )
    for r in range(len(result)):
        i = int(result.image_index[r])
        a = work[i]
        out.append(
            {
                "key": f"a{a['site_id']}:{a['relative_path']}:{float(result.eps_l2[r])}",
                "parent": f"c{a['site_id']}:{a['relative_path']}",
                "kind": "attack",
                "sha256": kept.sha256[r],
                "px": px,
                "site_id": a["site_id"],
                "eps_requested_l2": float(result.eps_l2[r]),
                "eps_realised_l2": float(result.realised_eps_l2[r]),
                "sign": int(result.sign[r]),
                "f_clean": float(result.f_clean[r]),
                "f_perturbed": float(result.f_adv[r]),
            }
        )
    for meta, position in controls:
        out.append({**meta, "sha256": sha[position]})
    log.info(
        "session %s: stimuli of chunk %d/%d made (%d stimuli)",
        plan["session_id"],
        chunk + 1,
        _chunk_count(plan),
        len(out),
    )
    return out


def _controls(
    plan: dict[str, Any],
    work: list[dict[str, Any]],
    clean_levels: torch.Tensor,
    f_clean: torch.Tensor,
    engine: AttackEngine,
    readout: torch.Tensor,
    writer: PngWriter,
    chunk: int,
    device: torch.device,
) -> list[tuple[dict[str, Any], int]]:
    """Model-free stimuli at each ε, scored with the generating model's predictions too: each
    stimulus's record and its PNG's position in ``writer``."""
    out: list[tuple[dict[str, Any], int]] = []
    px = plan["input_px"]
    n = len(work)
    partners = None
    for kind in plan["controls"]:
        for e_index, eps in enumerate(plan["eps_l2"]):
            if kind == "noise":
                generator = torch.Generator().manual_seed(
                    plan["seed"] * 7919 + chunk * 97 + e_index
                )
                control = gaussian_noise_control(clean_levels, eps, generator=generator)
            else:
                if partners is None:
                    partners = to_levels(
                        torch.stack([load_image(a["partner_path"], size_hw=(px, px)) for a in work])
                    )
                control = interpolation_control(clean_levels, partners, eps)
            levels = control.stimulus_levels(clean_levels)
            at = writer.submit(list(levels))
            f_control = engine.predict(from_levels(levels).to(device), readout.to(device)).cpu()
            for i in range(n):
                a = work[i]
                record = {
                    "key": f"{kind[0]}{a['site_id']}:{a['relative_path']}:{eps}",
                    "parent": f"c{a['site_id']}:{a['relative_path']}",
                    "kind": kind,
                    "px": px,
                    "site_id": a["site_id"],
                    "eps_requested_l2": float(eps),
                    "eps_realised_l2": float(control.realised_eps_l2[i]),
                    "f_clean": float(f_clean[i]),
                    "f_perturbed": float(f_control[i]),
                }
                out.append((record, at[i]))
    return out


@DBOS.step(name="itloop.generate.publish")
def _publish(plan: dict[str, Any], stimuli: list[dict[str, Any]]) -> dict[str, Any]:
    rt = runtime.current()
    store = _store()
    with rt.sessions() as db:
        session = db.get(RecordingSession, plan["session_id"])
        if session is None:
            raise ValueError(f"session {plan['session_id']} vanished")
        existing = db.scalar(select(Batch).where(Batch.session_id == session.id))
        if existing is not None:
            return {"batch_id": existing.id, "already_published": True}
        protocol = db.get(Protocol, session.protocol_id)
        if protocol is None:
            raise ValueError(f"session {session.id} names no protocol")
        images: dict[str, NewImage] = {}
        news: list[NewStimulus] = []
        for s in stimuli:
            if s["sha256"] not in images:
                images[s["sha256"]] = NewImage(
                    s["sha256"],
                    s["px"],
                    s["px"],
                    source=plan["source"] if s["kind"] == "clean" else "generated",
                    source_path=s.get("relative_path", ""),
                    class_label=s.get("class_label", ""),
                )
            derived = s["kind"] != "clean"
            news.append(
                NewStimulus(
                    key=s["key"],
                    image_sha256=s["sha256"],
                    kind=StimulusKind(s["kind"]),
                    parent_key=s.get("parent"),
                    site_id=s["site_id"],
                    eps_requested_l2=s.get("eps_requested_l2"),
                    eps_realised_l2=s.get("eps_realised_l2"),
                    sign=s.get("sign"),
                    model_version_id=plan["model_version_id"],
                    predicted_clean=s["f_clean"] if derived else None,
                    predicted_perturbed=s.get("f_perturbed"),
                )
            )
        slots = [
            StimulusSlot(s["key"], s.get("parent", s["key"]), s["kind"] == "clean") for s in stimuli
        ]
        gap = gap_in_presentations(protocol.min_partner_spacing_s, protocol.on_ms, protocol.off_ms)
        order = plan_rsvp(
            slots,
            repeats=protocol.repeats,
            images_per_trial=protocol.images_per_trial,
            min_partner_gap=gap,
            seed=plan["seed"],
        )
        batch = publish_batch(
            db,
            session,
            images=list(images.values()),
            stimuli=news,
            plan=[NewPresentation(i.seq, i.key, i.event_code, i.trial_index) for i in order.items],
            spare_event_codes=list(order.spare_event_codes),
            store=store,
        )
        db.commit()
        return {
            "batch_id": batch.id,
            "stimuli": len(news),
            "presentations": len(order.items),
            "manifest_sha256": batch.manifest_sha256,
        }


@DBOS.step(name="itloop.generate.fail_session")
def _fail_session(session_id: int, error: str) -> None:
    with runtime.current().sessions() as db:
        session = db.get(RecordingSession, session_id)
        if session is not None and session.state in (
            SessionState.scheduled,
            SessionState.generating,
        ):
            transition(db, session, SessionState.failed, actor=None, reason=error[:2000])
            db.commit()


@job_workflow(JobKind.generate)
def generate(job: JobRun, payload: dict[str, Any]) -> dict[str, Any]:
    session_id = int(payload["session_id"])
    started = time.monotonic()
    try:
        plan = _prepare(session_id)
        chunks = _chunk_count(plan)
        stimuli: list[dict[str, Any]] = []
        for chunk in range(chunks):
            stimuli += _attack(plan, chunk)
            done = (chunk + 1) / (chunks + 1)
            elapsed = time.monotonic() - started
            job.progress(done, eta_s=elapsed / done * (1 - done))
        return _publish(plan, stimuli)
    except Exception as exc:
        _fail_session(session_id, f"{type(exc).__name__}: {exc}")
        raise
