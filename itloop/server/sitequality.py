"""Per-site recording quality of a session: rate in the window, split-half reliability, clean σ.

Computed from the stored counts, and stored with each sensitivity analysis (``Analysis.result``
under :data:`RESULT_KEY`), so that a site's history across months of sessions reads one small
JSON object per session instead of every presentation of every session.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from itloop.server.db.tables import StimulusKind
from itloop.server.exports.trials import SessionArrays, split_half_reliability, stimulus_means

__all__ = [
    "RESULT_KEY",
    "SENSITIVITY_ANALYSIS_KIND",
    "SiteQuality",
    "from_record",
    "quality_record",
    "site_quality",
    "window_ms",
]

SENSITIVITY_ANALYSIS_KIND = "sensitivity"
"""``Analysis.kind`` of the nightly per-session sensitivity analysis."""

RESULT_KEY = "site_quality"


@dataclass(frozen=True)
class SiteQuality:
    site_id: int
    label: str
    rate_hz: float
    reliability: float
    sigma_clean: float
    n_clean: int


def window_ms(arrays: SessionArrays) -> float | None:
    """Length of the session's counting window in ms, or None when no response carries one."""
    if arrays.window_start_ms is None or arrays.window_end_ms is None:
        return None
    return arrays.window_end_ms - arrays.window_start_ms


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


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def quality_record(arrays: SessionArrays) -> dict[str, Any]:
    """The JSON-safe record stored with an analysis: usable count and every site's quality."""
    usable = int(arrays.usable.sum())
    sites: dict[str, Any] = {}
    if arrays.has_response.any():
        for q in site_quality(arrays, {}, window_ms(arrays)):
            sites[str(q.site_id)] = {
                "rate_hz": _finite_or_none(q.rate_hz),
                "reliability": _finite_or_none(q.reliability),
                "sigma_clean": _finite_or_none(q.sigma_clean),
                "n_clean": q.n_clean,
            }
    return {"usable": usable, "sites": sites}


def from_record(record: dict[str, Any], site_id: int, label: str) -> SiteQuality | None:
    """One site's quality from a stored :func:`quality_record`; None when it holds none."""
    entry = record.get("sites", {}).get(str(site_id))
    if entry is None:
        return None

    def number(key: str) -> float:
        value = entry.get(key)
        return math.nan if value is None else float(value)

    return SiteQuality(
        site_id=site_id,
        label=label,
        rate_hz=number("rate_hz"),
        reliability=number("reliability"),
        sigma_clean=number("sigma_clean"),
        n_clean=int(entry.get("n_clean", 0)),
    )
