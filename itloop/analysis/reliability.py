"""Split-half reliability of repeated responses and the correlation ceiling it implies.

For each site, the repeats of every image are split at random into two halves; the Pearson r
between the two halves' per-image means (over images), averaged over random splits, is the
split-half r. Spearman-Brown, ρ = 2r / (1 + r), turns it into the reliability of the mean over
all repeats. A noiseless predictor correlates with that noisy mean at most √ρ on average, which
is the ceiling a model's held-out r should be read against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Reliability", "split_half_reliability"]


@dataclass(frozen=True)
class Reliability:
    """Per site (N,): split-half r, its Spearman-Brown correction, and the ceiling √ρ on r."""

    split_half_r: NDArray[np.float64]
    spearman_brown: NDArray[np.float64]
    ceiling_r: NDArray[np.float64]
    n_images: NDArray[np.int64]


def _rowwise_pearson(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """(S, N, M) pairs with NaN where absent -> (S, N) Pearson r over M (NaN if < 3 pairs)."""
    keep = np.isfinite(a) & np.isfinite(b)
    n = keep.sum(-1)
    a0 = np.where(keep, a, 0.0)
    b0 = np.where(keep, b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = a0.sum(-1, keepdims=True) / n[..., None]
        mb = b0.sum(-1, keepdims=True) / n[..., None]
        da = np.where(keep, a - ma, 0.0)
        db = np.where(keep, b - mb, 0.0)
        r = (da * db).sum(-1) / np.sqrt((da**2).sum(-1) * (db**2).sum(-1))
    return np.where(n >= 3, r, np.nan)


def split_half_reliability(
    responses: ArrayLike, *, n_splits: int = 50, seed: int = 0
) -> Reliability:
    """(N, M, R) responses of N sites to M images over up to R repeats (NaN = no repeat).

    Images with fewer than 2 repeats of a site are left out for that site. Deterministic in
    ``seed``. Raises ValueError naming a wrong shape or split count.
    """
    data = np.asarray(responses, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"responses must be (N sites, M images, R repeats), got {data.shape}")
    if n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, got {n_splits}")
    if np.isinf(data).any():
        raise ValueError("responses contain an infinite value")
    rng = np.random.default_rng(seed)
    seen = np.isfinite(data)
    k = seen.sum(-1)
    halves_r = np.empty((n_splits, data.shape[0]))
    for s in range(n_splits):
        keys = np.where(seen, rng.random(data.shape), np.inf)
        rank = keys.argsort(-1).argsort(-1)
        first = seen & (rank < (k // 2)[..., None])
        second = seen & ~first
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_a = np.where(first, data, 0.0).sum(-1) / first.sum(-1)
            mean_b = np.where(second, data, 0.0).sum(-1) / second.sum(-1)
        usable = k >= 2
        halves_r[s] = _rowwise_pearson(
            np.where(usable, mean_a, np.nan)[None], np.where(usable, mean_b, np.nan)[None]
        )[0]
    r = halves_r.mean(0)
    rho = 2 * r / (1 + r)
    return Reliability(
        split_half_r=r,
        spearman_brown=rho,
        ceiling_r=np.sqrt(np.clip(rho, 0.0, 1.0)),
        n_images=(k >= 2).sum(-1).astype(np.int64),
    )
