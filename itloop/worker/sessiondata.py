"""Reading a recorded session back: usable trials, mean responses, and the day's lower bounds."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop import __version__
from itloop.analysis.sensitivity import clean_sigma, sign_corrected_lower_bound
from itloop.server.db.tables import (
    Analysis,
    Image,
    Presentation,
    RecordingSession,
    Response,
    SensitivityResult,
    SessionSite,
    Stimulus,
    StimulusKind,
)
from itloop.server.exports.trials import load_session
from itloop.server.sitequality import RESULT_KEY, SENSITIVITY_ANALYSIS_KIND, quality_record
from itloop.server.uploads import unpack_counts

__all__ = ["SessionTrials", "analyse_session", "session_trials"]

ANALYSIS_KIND = SENSITIVITY_ANALYSIS_KIND


@dataclass(frozen=True)
class SessionTrials:
    """A session's usable presentations: (T,) stimulus ids and (T, N) counts over its N sites."""

    session_id: int
    site_ids: list[int]
    stimulus_ids: NDArray[np.int64]
    counts: NDArray[np.float64]
    image_sha256: dict[int, str]


def session_trials(db: Session, session_id: int) -> SessionTrials:
    """Presentations that count: valid, fixated, with a complete response window."""
    site_ids = sorted(
        db.scalars(select(SessionSite.site_id).where(SessionSite.session_id == session_id))
    )
    rows = db.execute(
        select(Presentation.stimulus_id, Response.counts, Response.n_sites)
        .join(Response, Response.presentation_id == Presentation.id)
        .where(
            Presentation.session_id == session_id,
            Presentation.valid.is_(True),
            Presentation.fixation_ok.is_(True),
            Response.complete.is_(True),
        )
        .order_by(Presentation.seq)
    ).all()
    stimulus_ids = np.array([r[0] for r in rows], dtype=np.int64)
    counts = (
        np.stack([unpack_counts(r[1], r[2]) for r in rows]).astype(np.float64)
        if rows
        else np.zeros((0, len(site_ids)))
    )
    images = dict(
        db.execute(
            select(Stimulus.id, Image.sha256)
            .join(Image, Image.id == Stimulus.image_id)
            .where(Stimulus.session_id == session_id)
        ).all()
    )
    return SessionTrials(session_id, site_ids, stimulus_ids, counts, images)


def _means(trials: SessionTrials) -> dict[int, NDArray[np.float64]]:
    """Mean (N,) response vector per stimulus over its usable repeats."""
    grouped: dict[int, list[int]] = defaultdict(list)
    for t, stim in enumerate(trials.stimulus_ids.tolist()):
        grouped[stim].append(t)
    return {stim: trials.counts[idx].mean(axis=0) for stim, idx in grouped.items()}


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def analyse_session(db: Session, session_id: int, *, seed: int = 0) -> Analysis:
    """The session's normalised lower bound per site × ε × stimulus kind (not committed).

    Signs come from the predictions the generating model stored with each stimulus, never from
    a later model. σ of a site is the s.d. of its mean responses over all clean images of the
    session (every site sees every image).
    """
    session = db.get(RecordingSession, session_id)
    if session is None:
        raise ValueError(f"session {session_id} does not exist")
    trials = session_trials(db, session_id)
    means = _means(trials)
    column = {site: j for j, site in enumerate(trials.site_ids)}
    stimuli = db.execute(
        select(
            Stimulus.id,
            Stimulus.kind,
            Stimulus.parent_id,
            Stimulus.site_id,
            Stimulus.eps_requested_l2,
            Stimulus.predicted_clean,
            Stimulus.predicted_perturbed,
        ).where(Stimulus.session_id == session_id)
    ).all()
    clean_ids = [s.id for s in stimuli if s.kind is StimulusKind.clean and s.id in means]
    sigma = {}
    for site, j in column.items():
        values = [means[c][j] for c in clean_ids]
        if len(values) >= 2:
            sigma[site] = clean_sigma(values)
    groups: dict[tuple[int, float, StimulusKind], list[tuple[float, float, float, float]]] = (
        defaultdict(list)
    )
    for s in stimuli:
        if s.kind is StimulusKind.clean or s.site_id not in column:
            continue
        if s.id not in means or s.parent_id not in means:
            continue
        if s.predicted_clean is None or s.predicted_perturbed is None:
            continue
        j = column[s.site_id]
        groups[(s.site_id, float(s.eps_requested_l2 or 0.0), s.kind)].append(
            (means[s.parent_id][j], means[s.id][j], s.predicted_clean, s.predicted_perturbed)
        )
    analysis = Analysis(
        kind=ANALYSIS_KIND,
        subject_id=session.subject_id,
        session_id=session_id,
        model_version_id=session.model_version_id,
        config={"estimator": "sign-corrected lower bound", "bootstrap": 2000, "seed": seed},
        inputs_sha256=_digest(
            [trials.stimulus_ids.tobytes(), trials.counts.tobytes(), repr(sorted(groups)).encode()]
        ),
        code_version=__version__,
        result={
            "n_trials": int(trials.stimulus_ids.size),
            "n_groups": len(groups),
            RESULT_KEY: quality_record(load_session(db, session_id)),
        },
    )
    db.add(analysis)
    db.flush()
    day = session.scheduled_for.date()
    for (site, eps, kind), pairs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2].value)
    ):
        if site not in sigma or sigma[site] <= 0:
            continue
        rc, rp, fc, fp = (np.array(v) for v in zip(*pairs, strict=True))
        estimate = sign_corrected_lower_bound(rc, rp, fc, fp, sigma=sigma[site], seed=seed)
        db.add(
            SensitivityResult(
                analysis_id=analysis.id,
                site_id=site,
                day=day,
                eps_l2=eps,
                kind=kind,
                n_images=estimate.n_images,
                lower_bound=estimate.lower_bound,
                lower_bound_normalised=estimate.lower_bound_normalised,
                ci_low=estimate.ci_low,
                ci_high=estimate.ci_high,
                sigma_clean=estimate.sigma_clean,
                naive_abs_normalised=estimate.naive_abs_normalised,
                rms_normalised=estimate.rms_normalised,
            )
        )
    return analysis
