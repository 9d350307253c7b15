"""What the session page shows about a recording: upload coverage and per-site quality."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from itloop.server.exports.trials import SessionArrays
from itloop.server.sitequality import SiteQuality, site_quality

__all__ = ["Coverage", "SiteQuality", "coverage", "site_quality"]


@dataclass(frozen=True)
class Coverage:
    planned: int
    uploaded: int
    usable: int
    fixation_lost: int
    with_frame_drops: int
    frame_drops: int
    incomplete_windows: int
    no_onset: int
    images: int
    min_repeats: int
    median_repeats: float
    images_short: int
    repeats_wanted: int

    @property
    def uploaded_fraction(self) -> float:
        return self.uploaded / self.planned if self.planned else 0.0


def coverage(arrays: SessionArrays, *, planned: int, repeats_wanted: int) -> Coverage:
    """Counts over the presentations of a session (``planned`` from its batch)."""
    up = arrays.uploaded
    usable = arrays.usable
    per_stimulus = dict.fromkeys(arrays.stimuli, 0)
    for stim in arrays.stimulus_id[usable].tolist():
        per_stimulus[int(stim)] = per_stimulus.get(int(stim), 0) + 1
    repeats = np.array(list(per_stimulus.values()) or [0])
    return Coverage(
        planned=planned,
        uploaded=int(up.sum()),
        usable=int(usable.sum()),
        fixation_lost=int((up & arrays.fixation_known & ~arrays.fixation_ok).sum()),
        with_frame_drops=int((up & (arrays.frame_drops > 0)).sum()),
        frame_drops=int(arrays.frame_drops[up].sum()),
        incomplete_windows=int((arrays.has_response & ~arrays.complete).sum()),
        no_onset=int((up & ~arrays.has_onset).sum()),
        images=len(per_stimulus),
        min_repeats=int(repeats.min()),
        median_repeats=float(np.median(repeats)),
        images_short=int((repeats < repeats_wanted).sum()) if up.any() else 0,
        repeats_wanted=repeats_wanted,
    )
