"""The refit job: a new immutable model version from every response so far, then the day's bounds.

Steps (durable):

1. ``fit``: the subject's trials from every uploaded session (valid, fixated, complete windows)
   are written to a memory-mapped trial set; the current model version is fitted end to end on
   them, warm-started from its own weights; the result becomes a new version whose parent is
   the old one. A refit of the same data onto the same parent returns the version it made
   before (idempotent per subject and night).
2. ``analyse``: every uploaded session's lower bound per site × ε × kind, with the signs its
   generating model stored; the session becomes ``analysed``.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dbos import DBOS
from sqlalchemy import select

from itloop.models import FitConfig, NpyTrialDataset, fit
from itloop.protocol.jobs import JobKind
from itloop.server.artifacts import ContentStore
from itloop.server.db.tables import ModelVersion, RecordingSession, SessionState
from itloop.server.sessions import current_model_version, transition
from itloop.stimulus.images import decode_png
from itloop.worker import runtime
from itloop.worker.generation import resolve_device
from itloop.worker.modelstore import load_model, record_version, site_order
from itloop.worker.sessiondata import analyse_session, session_trials
from itloop.worker.workflows import JobRun, job_workflow

__all__ = ["refit"]

_RECORDED = (SessionState.uploaded, SessionState.analysed)


def _fit_config(payload: dict[str, Any], seed: int) -> FitConfig:
    allowed = {f.name for f in fields(FitConfig)}
    overrides = dict(payload.get("fit") or {})
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown fit settings {unknown}; known: {sorted(allowed)}")
    overrides.setdefault("seed", seed)
    return FitConfig(**overrides)


def _build_trials(
    db: Any, store: ContentStore, session_ids: list[int], sites: list[int], px: int, folder: Path
) -> tuple[NpyTrialDataset, str, int]:
    """Write the trial set of ``session_ids`` into ``folder``; returns it, its fingerprint, T."""
    column = {site: j for j, site in enumerate(sites)}
    per_session = [session_trials(db, sid) for sid in session_ids]
    shas: list[str] = []
    index: dict[str, int] = {}
    image_ids: list[np.ndarray] = []
    responses: list[np.ndarray] = []
    digest = hashlib.sha256()
    for trials in per_session:
        digest.update(f"session {trials.session_id};".encode())
        digest.update(trials.stimulus_ids.tobytes())
        digest.update(trials.counts.tobytes())
        ids = np.empty(trials.stimulus_ids.size, dtype=np.int64)
        for t, stim in enumerate(trials.stimulus_ids.tolist()):
            sha = trials.image_sha256[stim]
            if sha not in index:
                index[sha] = len(shas)
                shas.append(sha)
            ids[t] = index[sha]
        block = np.full((trials.stimulus_ids.size, len(sites)), np.nan, dtype=np.float32)
        for j, site in enumerate(trials.site_ids):
            if site in column:
                block[:, column[site]] = trials.counts[:, j]
        image_ids.append(ids)
        responses.append(block)
    n_trials = int(sum(a.size for a in image_ids))
    if n_trials == 0:
        raise ValueError(f"sessions {session_ids} have no usable trials to fit on")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    images = np.lib.format.open_memmap(  # type: ignore[no-untyped-call]
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(len(shas), 3, px, px)
    )
    for i, sha in enumerate(shas):
        levels = decode_png(store.get(sha))
        if tuple(levels.shape[1:]) != (px, px):
            raise ValueError(f"stimulus {sha} is {tuple(levels.shape[1:])}, the model takes {px}")
        images[i] = levels.numpy()
    images.flush()
    del images
    np.save(folder / "image_ids.npy", np.concatenate(image_ids))
    np.save(folder / "responses.npy", np.concatenate(responses))
    return NpyTrialDataset(folder), digest.hexdigest(), n_trials


@DBOS.step(name="itloop.refit.fit")
def _fit(subject_id: int, night: str, payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    store = ContentStore(rt.settings.artifact_dir)
    device = resolve_device(rt.settings.device)
    with rt.sessions() as db:
        parent = current_model_version(db, subject_id)
        if parent is None:
            raise ValueError(f"subject {subject_id} has no model version to refit")
        session_ids = list(
            db.scalars(
                select(RecordingSession.id)
                .where(
                    RecordingSession.subject_id == subject_id,
                    RecordingSession.state.in_(_RECORDED),
                )
                .order_by(RecordingSession.scheduled_for, RecordingSession.id)
            )
        )
        if not session_ids:
            raise ValueError(f"subject {subject_id} has no uploaded sessions to fit on")
        sites = site_order(db, parent)
        px = int(parent.config["input_px"])
        folder = rt.settings.data_dir / "work" / f"refit-{subject_id}-{night}"
        dataset, fingerprint, n_trials = _build_trials(db, store, session_ids, sites, px, folder)
        reused = db.scalar(
            select(ModelVersion).where(
                ModelVersion.parent_id == parent.id,
                ModelVersion.training_data_fingerprint == fingerprint,
            )
        )
        if reused is not None:
            shutil.rmtree(folder, ignore_errors=True)
            return {"model_version_id": reused.id, "reused": True}
        model = copy.deepcopy(load_model(store, parent, device))
        for p in model.parameters():
            p.requires_grad_(True)
        seed = int(hashlib.sha256(f"{subject_id}:{night}".encode()).hexdigest()[:8], 16)
        result = fit(model, dataset, _fit_config(payload, seed))
        site_r = [None if not np.isfinite(r) else float(r) for r in result.site_r]
        version = record_version(
            db,
            store,
            result.model.eval(),
            subject_id=subject_id,
            parent=parent,
            sites=sites,
            fingerprint=fingerprint,
            n_trials=n_trials,
            metrics={**result.metrics, "sessions": session_ids, "night": night},
            site_r=site_r,
        )
        db.commit()
        shutil.rmtree(folder, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {
            "model_version_id": version.id,
            "parent_id": parent.id,
            "n_trials": n_trials,
            "median_val_r": result.metrics.get("median_val_r"),
        }


@DBOS.step(name="itloop.refit.analyse")
def _analyse(subject_id: int) -> list[int]:
    analysed = []
    with runtime.current().sessions() as db:
        sessions = list(
            db.scalars(
                select(RecordingSession)
                .where(
                    RecordingSession.subject_id == subject_id,
                    RecordingSession.state == SessionState.uploaded,
                )
                .order_by(RecordingSession.id)
            )
        )
        for session in sessions:
            analyse_session(db, session.id)
            transition(db, session, SessionState.analysed, actor=None)
            db.commit()
            analysed.append(session.id)
    return analysed


@job_workflow(JobKind.refit)
def refit(job: JobRun, payload: dict[str, Any]) -> dict[str, Any]:
    subject_id = int(payload["subject_id"])
    night = str(payload.get("night") or "manual")
    fitted = _fit(subject_id, night, payload)
    job.progress(0.8)
    analysed = _analyse(subject_id)
    return {**fitted, "analysed_sessions": analysed}
