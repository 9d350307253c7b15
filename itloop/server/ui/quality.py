"""What the session page shows about a recording: upload coverage and per-site quality."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from itloop.server.db.tables import StimulusKind
from itloop.server.exports.trials import SessionArrays, split_half_reliability, stimulus_means


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


@dataclass(frozen=True)
class SiteQuality:
    site_id: int
    label: str
    rate_hz: float
    reliability: float
    sigma_clean: float
    n_clean: int


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


def site_quality(
    arrays: SessionArrays, labels: dict[int, str], window_ms: float | None
) -> list[SiteQuality]:
    """Per site: mean rate in the window, split-half reliability, clean-image σ (counts)."""
    usable = arrays.usable
    reliability = split_half_reliability(arrays)
    means = stimulus_means(arrays)
    clean = [s for s, i in arrays.stimuli.items() if i.kind is StimulusKind.clean and s in means]
    window_s = (window_ms or math.nan) / 1000.0
    out = []
    for j, site in enumerate(arrays.site_ids):
        counts = arrays.counts[usable, j]
        rate = float(counts.mean()) / window_s if counts.size and window_s > 0 else math.nan
        values = [means[c][j] for c in clean]
        sigma = float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan
        out.append(
            SiteQuality(
                site_id=site,
                label=labels.get(site, str(site)),
                rate_hz=rate,
                reliability=float(reliability[j]),
                sigma_clean=sigma,
                n_clean=len(values),
            )
        )
    return out
