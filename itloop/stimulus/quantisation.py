"""The 8-bit grid stimuli live on: levels, realised budgets, and a budget-safe search on the grid.

Stimuli are stored as 8-bit PNGs, so the perturbation that reaches the monkey is an integer number
of levels per pixel, ``k = levels(x + δ) − levels(x)``, and its realised L2 norm in [0, 1] units is
``sqrt(Σ k²) / 255``. Rounding alone adds noise of norm ≈ 0.44 on 3×224×224, comparable to ε = 1, so
the realised budget is decided here in exact integer arithmetic and never exceeds the requested ε.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from itloop.stimulus.errors import AttackError

__all__ = [
    "LEVELS",
    "check_levels",
    "from_levels",
    "max_sum_sq_levels",
    "perturbed_levels",
    "quantise",
    "quantise_perturbation",
    "realised_eps_l2",
    "to_levels",
]

LEVELS = 255
_DIMS = (1, 2, 3)


def to_levels(x: Tensor) -> Tensor:
    """(..., C, H, W) float images in [0, 1] -> uint8 levels, round half to even."""
    return torch.round(x.float() * LEVELS).clamp(0, LEVELS).to(torch.uint8)


def from_levels(levels: Tensor) -> Tensor:
    """(..., C, H, W) uint8 levels -> float32 images in [0, 1] (exact multiples of 1/255)."""
    return levels.float() / LEVELS


def perturbed_levels(clean_levels: np.ndarray, delta_levels: np.ndarray) -> np.ndarray:
    """uint8 clean levels + int16 level changes (same shape, changes within [0, 255] of the clean
    image, as :func:`quantise_perturbation` makes them) -> the uint8 perturbed levels. In numpy:
    it runs on the PNG threads, where each torch call would give the GIL up and take it back."""
    image = clean_levels.astype(np.int16)
    image += delta_levels
    return image.astype(np.uint8)


def quantise(x: Tensor) -> Tensor:
    """(..., C, H, W) float images -> the nearest 8-bit image, as float32 in [0, 1]."""
    return from_levels(to_levels(x))


def max_sum_sq_levels(eps_l2: Tensor) -> Tensor:
    """(B,) requested ε in [0, 1] units -> (B,) int64 largest S with sqrt(S) / 255 ≤ ε (float64)."""
    eps = eps_l2.detach().double().cpu().numpy()
    if eps.size and (not np.all(np.isfinite(eps)) or eps.min() < 0):
        raise ValueError(f"eps_l2 must be finite and >= 0, got {eps.tolist()!r}")
    s = np.floor(np.square(eps * LEVELS)).astype(np.int64)
    for _ in range(4):
        over = np.sqrt(s.astype(np.float64)) / LEVELS > eps
        s = np.where(over, s - 1, s)
        under = np.sqrt((s + 1).astype(np.float64)) / LEVELS <= eps
        s = np.where(under & ~over, s + 1, s)
    s = np.maximum(s, 0)
    if np.any(np.sqrt(s.astype(np.float64)) / LEVELS > eps):
        raise AttackError(f"could not fit an integer budget under eps_l2={eps.tolist()!r}")
    return torch.from_numpy(s).to(eps_l2.device)


def realised_eps_l2(k: Tensor) -> Tensor:
    """(B, C, H, W) integer level changes -> (B,) float64 realised L2 norm in [0, 1] units."""
    sum_sq = k.to(torch.int64).square().sum(_DIMS)
    return sum_sq.double().sqrt() / LEVELS


def _sum_sq(k: Tensor) -> Tensor:
    return k.to(torch.int64).square().sum(_DIMS)


def _trim(k: Tensor, grad: Tensor, s_max: Tensor) -> Tensor:
    """Step |k| down by one level on the pixels that cost the objective least per unit of norm."""
    for _ in range(LEVELS + 1):
        excess = _sum_sq(k) - s_max
        over = excess > 0
        if not bool(over.any()):
            return k
        flat = k.flatten(1)
        absk = flat.abs().to(torch.int64)
        gain_sign = torch.sign(flat).to(grad.dtype)
        loss = grad.flatten(1) * gain_sign
        saved = (2 * absk - 1).clamp_min(0)
        ratio = torch.where(absk > 0, loss / saved.clamp_min(1).to(loss.dtype), math.inf)
        order = torch.argsort(ratio, dim=1, stable=True)
        saved_sorted = torch.gather(saved, 1, order)
        before = torch.cumsum(saved_sorted, dim=1) - saved_sorted
        take_sorted = (before < excess.clamp_min(0).unsqueeze(1)) & (saved_sorted > 0)
        take_sorted &= over.unsqueeze(1)
        take = torch.zeros_like(take_sorted).scatter_(1, order, take_sorted)
        flat = flat - torch.where(take, torch.sign(flat), torch.zeros_like(flat))
        k = flat.view_as(k)
    raise AttackError("quantisation trim did not converge")  # unreachable: k = 0 always fits


def _fill(k: Tensor, clean: Tensor, grad: Tensor, s_max: Tensor) -> Tensor:
    """One greedy round: step single levels along the gradient while the integer budget allows."""
    flat = k.flatten(1)
    g = grad.flatten(1)
    move = torch.sign(g).to(flat.dtype)
    new_level = clean.flatten(1).to(flat.dtype) + flat + move
    ok = (move != 0) & (new_level >= 0) & (new_level <= LEVELS)
    cost = (2 * flat.to(torch.int64) * move.to(torch.int64) + 1) * ok
    gain = g.abs()
    ratio = torch.where(cost <= 0, math.inf, gain / cost.clamp_min(1).to(gain.dtype))
    ratio = torch.where(ok, ratio, -math.inf)
    order = torch.argsort(ratio, dim=1, descending=True, stable=True)
    cost_sorted = torch.gather(cost, 1, order)
    ok_sorted = torch.gather(ok, 1, order)
    slack = (s_max - _sum_sq(k)).unsqueeze(1)
    take_sorted = ok_sorted & (torch.cumsum(cost_sorted, dim=1) <= slack)
    take = torch.zeros_like(take_sorted).scatter_(1, order, take_sorted)
    flat = flat + torch.where(take, move, torch.zeros_like(move))
    return flat.view_as(k)


def quantise_perturbation(
    clean_levels: Tensor, delta: Tensor, grad: Tensor | None, eps_l2: Tensor
) -> Tensor:
    """A continuous perturbation -> the best integer level change found within the requested ε.

    clean_levels: (B, C, H, W) uint8 clean images; delta: (B, C, H, W) perturbation in [0, 1] units;
    grad: (B, C, H, W) gradient of the objective being maximised at the rounded point (None: plain
    round-and-trim); eps_l2: (B,) requested radii. Returns (B, C, H, W) int16 level changes k with
    ``0 ≤ clean + k ≤ 255`` and ``sqrt(Σ k²) / 255 ≤ ε`` on every row, checked in integers.

    Round; if over budget, step |k| down one level at a time on the pixels where the linearised
    objective loses least per unit of squared norm saved, until it fits (k = 0 always fits, so this
    ends); then spend any slack left by rounding on single-level steps along the gradient, best gain
    per unit of squared norm first. Without a gradient the trim keeps the pixels most aligned with δ
    and there is no fill (controls: the realised change stays a rounded, shortened copy of δ).
    """
    if clean_levels.dtype != torch.uint8:
        raise ValueError(f"clean_levels must be uint8, got {clean_levels.dtype}")
    if delta.shape != clean_levels.shape:
        raise ValueError(
            f"delta {tuple(delta.shape)} and clean_levels {tuple(clean_levels.shape)} differ"
        )
    lv = clean_levels.to(torch.int16)
    k = torch.round(delta.float() * LEVELS).to(torch.int16)
    k = torch.maximum(torch.minimum(k, LEVELS - lv), -lv)
    s_max = max_sum_sq_levels(eps_l2).to(k.device)
    g = grad.float() if grad is not None else delta.float()
    k = _trim(k, g, s_max)
    if grad is not None:
        k = _fill(k, clean_levels, g, s_max)
    check_levels(clean_levels, k, s_max)
    return k


def check_levels(clean_levels: Tensor, k: Tensor, s_max: Tensor) -> None:
    """Raise AttackError unless each row's level change fits its integer budget and 8-bit box."""
    new = clean_levels.to(torch.int16) + k
    if bool(((new < 0) | (new > LEVELS)).any()):
        raise AttackError(
            f"quantised image leaves [0, 255]: range {int(new.min())}..{int(new.max())}"
        )
    sum_sq = _sum_sq(k)
    bad = sum_sq > s_max
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AttackError(
            f"row {i}: realised L2 {math.sqrt(int(sum_sq[i])) / LEVELS:.6g} exceeds budget "
            f"{math.sqrt(int(s_max[i])) / LEVELS:.6g}"
        )
