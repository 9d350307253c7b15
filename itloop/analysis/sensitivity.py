"""The sign-corrected lower bound on a site's adversarial sensitivity (Guo et al., §3.1).

For a site and a budget ε, over images j = 1…M with clean image x_j and perturbed x_j + δ_j:

    s = (1/M) Σ_j sign(f(x_j) − f(x_j + δ_j)) · (r(x_j) − r(x_j + δ_j))

where f is the model **that generated** δ_j (its predictions are stored with the stimulus) and r
are measured mean responses. With noisy r, E[s] ≤ E|r(x) − r(x + δ)|, with equality when the
model's signs are right; the naive mean |Δr| is biased upward by noise. Normalised by σ, the s.d.
of the site's mean responses over clean images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["SensitivityEstimate", "clean_sigma", "sign_corrected_lower_bound", "stimulus_means"]


@dataclass(frozen=True)
class SensitivityEstimate:
    """One site at one ε (responses in the units of r, e.g. spikes per window)."""

    n_images: int
    lower_bound: float
    lower_bound_normalised: float
    ci_low: float
    ci_high: float
    sigma_clean: float
    naive_abs: float
    naive_abs_normalised: float
    rms_normalised: float


def _vector(name: str, values: ArrayLike) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name}[{bad}] is {array[bad]}, not a finite number")
    return array


def clean_sigma(clean_means: ArrayLike) -> float:
    """σ: the s.d. (ddof=1) of a site's mean responses over clean images."""
    values = _vector("clean_means", clean_means)
    if values.size < 2:
        raise ValueError(f"σ needs at least 2 clean images, got {values.size}")
    return float(np.std(values, ddof=1))


def sign_corrected_lower_bound(
    r_clean: ArrayLike,
    r_perturbed: ArrayLike,
    f_clean: ArrayLike,
    f_perturbed: ArrayLike,
    *,
    sigma: float,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SensitivityEstimate:
    """The bound with a percentile bootstrap interval over images (seeded, reproducible).

    All four arrays are (M,) over the same images: measured mean responses to the clean and
    perturbed images, and the generating model's predictions for them.
    """
    rc = _vector("r_clean", r_clean)
    rp = _vector("r_perturbed", r_perturbed)
    fc = _vector("f_clean", f_clean)
    fp = _vector("f_perturbed", f_perturbed)
    if not (rc.size == rp.size == fc.size == fp.size):
        raise ValueError(
            f"arrays differ in length: r_clean {rc.size}, r_perturbed {rp.size}, "
            f"f_clean {fc.size}, f_perturbed {fp.size}"
        )
    if rc.size == 0:
        raise ValueError("no images: the bound needs at least one clean/perturbed pair")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma {sigma} must be a positive finite number")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must lie in (0, 1)")
    if n_boot < 1:
        raise ValueError(f"n_boot {n_boot} must be at least 1")
    delta_r = rc - rp
    terms = np.sign(fc - fp) * delta_r
    bound = float(terms.mean())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, terms.size, size=(n_boot, terms.size))
    boots = terms[picks].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    naive = float(np.abs(delta_r).mean())
    rms = float(np.sqrt(np.mean(delta_r**2)))
    return SensitivityEstimate(
        n_images=int(terms.size),
        lower_bound=bound,
        lower_bound_normalised=bound / sigma,
        ci_low=float(low) / sigma,
        ci_high=float(high) / sigma,
        sigma_clean=sigma,
        naive_abs=naive,
        naive_abs_normalised=naive / sigma,
        rms_normalised=rms / sigma,
    )


def stimulus_means(stimulus_ids: Sequence[int], counts: ArrayLike) -> dict[int, float]:
    """Mean count per stimulus over its valid repeats: ids (T,), counts (T,) → {id: mean}."""
    values = _vector("counts", counts)
    ids = np.asarray(stimulus_ids, dtype=np.int64)
    if ids.shape != values.shape:
        raise ValueError(f"{ids.size} stimulus ids for {values.size} counts")
    if ids.size == 0:
        return {}
    order = np.argsort(ids, kind="stable")
    unique, starts, n = np.unique(ids[order], return_index=True, return_counts=True)
    sums = np.add.reduceat(values[order], starts)
    return {int(u): float(s / c) for u, s, c in zip(unique, sums, n, strict=True)}
