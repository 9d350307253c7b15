"""A session read back as arrays: every presentation × site count, with its stimulus metadata.

Shared by the NWB and table exports, the figures and the per-site quality checks, so that they
all count the same presentations the same way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop.server.db.tables import (
    Image,
    Presentation,
    Response,
    SessionSite,
    Stimulus,
    StimulusKind,
)
from itloop.server.errors import NotFound
from itloop.server.uploads import unpack_counts

__all__ = [
    "MISSING_COUNT",
    "SessionArrays",
    "StimulusInfo",
    "load_session",
    "split_half_reliability",
    "stimulus_means",
]

MISSING_COUNT = -1
"""The count stored where a presentation has no response (not shown, or no onset marker)."""


@dataclass(frozen=True)
class StimulusInfo:
    id: int
    kind: StimulusKind
    sha256: str
    parent_id: int | None
    site_id: int | None
    eps_requested_l2: float | None
    eps_realised_l2: float | None
    sign: int | None
    model_version_id: int | None
    predicted_clean: float | None
    predicted_perturbed: float | None


@dataclass(frozen=True)
class SessionArrays:
    """Presentations in ``seq`` order, (P,) each, and counts (P, N) over the N session sites.

    ``counts`` is ``MISSING_COUNT`` in rows without a response. ``usable`` marks what the
    estimator counts: valid, fixated, with a complete response window.
    """

    session_id: int
    site_ids: list[int]
    presentation_id: NDArray[np.int64]
    seq: NDArray[np.int64]
    trial_index: NDArray[np.int64]
    event_code: NDArray[np.int64]
    stimulus_id: NDArray[np.int64]
    onset_ticks: NDArray[np.int64]
    has_onset: NDArray[np.bool_]
    tick_rate_hz: NDArray[np.int64]
    photodiode_delay_ticks: NDArray[np.int64]
    uploaded: NDArray[np.bool_]
    fixation_ok: NDArray[np.bool_]
    fixation_known: NDArray[np.bool_]
    frame_drops: NDArray[np.int64]
    valid: NDArray[np.bool_]
    has_response: NDArray[np.bool_]
    complete: NDArray[np.bool_]
    counts: NDArray[np.int32]
    window_start_ms: float | None
    window_end_ms: float | None
    stimuli: dict[int, StimulusInfo]

    @property
    def usable(self) -> NDArray[np.bool_]:
        return self.valid & self.fixation_ok & self.has_response & self.complete

    @property
    def n_presentations(self) -> int:
        return int(self.seq.size)

    def only_sites(self, site_ids: list[int]) -> SessionArrays:
        """The same presentations with the counts of ``site_ids`` only (each a session site)."""
        column = {site: j for j, site in enumerate(self.site_ids)}
        missing = [s for s in site_ids if s not in column]
        if missing:
            raise NotFound(
                f"site(s) {missing} are not sites of session {self.session_id}",
                field="site_id",
                value=missing[0],
            )
        cols = [column[s] for s in site_ids]
        return replace(self, site_ids=list(site_ids), counts=self.counts[:, cols])


def load_session(db: Session, session_id: int) -> SessionArrays:
    """Every presentation of ``session_id`` (planned or re-queued) with its counts."""
    site_ids = sorted(
        db.scalars(select(SessionSite.site_id).where(SessionSite.session_id == session_id))
    )
    if not site_ids:
        raise NotFound(f"session {session_id} has no sites", field="session_id", value=session_id)
    rows = db.execute(
        select(
            Presentation.id,
            Presentation.seq,
            Presentation.trial_index,
            Presentation.event_code,
            Presentation.stimulus_id,
            Presentation.onset_ticks,
            Presentation.tick_rate_hz,
            Presentation.photodiode_delay_ticks,
            Presentation.uploaded_at,
            Presentation.fixation_ok,
            Presentation.frame_drops,
            Presentation.valid,
            Response.counts,
            Response.n_sites,
            Response.complete,
            Response.window_start_ms,
            Response.window_end_ms,
        )
        .outerjoin(Response, Response.presentation_id == Presentation.id)
        .where(Presentation.session_id == session_id)
        .order_by(Presentation.seq)
    ).all()
    n_rows, n_sites = len(rows), len(site_ids)
    counts = np.full((n_rows, n_sites), MISSING_COUNT, dtype=np.int32)
    window: tuple[float, float] | None = None
    for i, row in enumerate(rows):
        if row.counts is not None:
            counts[i] = unpack_counts(row.counts, row.n_sites)
            window = window or (float(row.window_start_ms), float(row.window_end_ms))

    def ints(values: list[int | None], missing: int = 0) -> NDArray[np.int64]:
        return np.array([missing if v is None else v for v in values], dtype=np.int64)

    def flags(values: list[bool | None]) -> NDArray[np.bool_]:
        return np.array([bool(v) for v in values], dtype=bool)

    return SessionArrays(
        session_id=session_id,
        site_ids=site_ids,
        presentation_id=ints([r.id for r in rows]),
        seq=ints([r.seq for r in rows]),
        trial_index=ints([r.trial_index for r in rows]),
        event_code=ints([r.event_code for r in rows]),
        stimulus_id=ints([r.stimulus_id for r in rows]),
        onset_ticks=ints([r.onset_ticks for r in rows], missing=-1),
        has_onset=flags([r.onset_ticks is not None for r in rows]),
        tick_rate_hz=ints([r.tick_rate_hz for r in rows]),
        photodiode_delay_ticks=ints([r.photodiode_delay_ticks for r in rows]),
        uploaded=flags([r.uploaded_at is not None for r in rows]),
        fixation_ok=flags([r.fixation_ok for r in rows]),
        fixation_known=flags([r.fixation_ok is not None for r in rows]),
        frame_drops=ints([r.frame_drops for r in rows]),
        valid=flags([r.valid for r in rows]),
        has_response=flags([r.counts is not None for r in rows]),
        complete=flags([r.counts is not None and r.complete for r in rows]),
        counts=counts,
        window_start_ms=window[0] if window else None,
        window_end_ms=window[1] if window else None,
        stimuli=_stimuli(db, session_id),
    )


def _stimuli(db: Session, session_id: int) -> dict[int, StimulusInfo]:
    rows = db.execute(
        select(Stimulus, Image.sha256)
        .join(Image, Image.id == Stimulus.image_id)
        .where(Stimulus.session_id == session_id)
        .order_by(Stimulus.id)
    ).all()
    return {
        s.id: StimulusInfo(
            id=s.id,
            kind=s.kind,
            sha256=sha,
            parent_id=s.parent_id,
            site_id=s.site_id,
            eps_requested_l2=s.eps_requested_l2,
            eps_realised_l2=s.eps_realised_l2,
            sign=s.sign,
            model_version_id=s.model_version_id,
            predicted_clean=s.predicted_clean,
            predicted_perturbed=s.predicted_perturbed,
        )
        for s, sha in rows
    }


def stimulus_means(arrays: SessionArrays) -> dict[int, NDArray[np.float64]]:
    """Mean (N,) count vector per stimulus over its usable repeats."""
    grouped: dict[int, list[int]] = defaultdict(list)
    for row in np.flatnonzero(arrays.usable).tolist():
        grouped[int(arrays.stimulus_id[row])].append(row)
    return {
        stim: arrays.counts[rows].astype(np.float64).mean(axis=0) for stim, rows in grouped.items()
    }


def split_half_reliability(arrays: SessionArrays) -> NDArray[np.float64]:
    """Spearman–Brown corrected split-half reliability per site, (N,); NaN where undefined.

    Usable repeats of each stimulus are split alternately (1st, 3rd, … vs 2nd, 4th, …); only
    stimuli with at least two usable repeats take part.
    """
    grouped: dict[int, list[int]] = defaultdict(list)
    for row in np.flatnonzero(arrays.usable).tolist():
        grouped[int(arrays.stimulus_id[row])].append(row)
    odd, even = [], []
    for rows in grouped.values():
        if len(rows) >= 2:
            odd.append(arrays.counts[rows[0::2]].astype(np.float64).mean(axis=0))
            even.append(arrays.counts[rows[1::2]].astype(np.float64).mean(axis=0))
    n_sites = len(arrays.site_ids)
    out = np.full(n_sites, np.nan)
    if len(odd) < 3:
        return out
    a, b = np.stack(odd), np.stack(even)
    for j in range(n_sites):
        x, y = a[:, j], b[:, j]
        if np.std(x) == 0 or np.std(y) == 0:
            continue
        r = float(np.corrcoef(x, y)[0, 1])
        out[j] = 2 * r / (1 + r) if r > -1 else np.nan
    return out
