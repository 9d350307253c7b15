"""Model-free control perturbations at the same realised ε: Gaussian noise, interpolation to another
image.

Both walk a ray from the clean image, ``x + s·d``, clip to the box and round to 8 bits, and take the
largest s (bisection, 48 halvings) whose quantised image is within the requested ε in exact integer
arithmetic. Exactly ε is not reachable on an integer grid; along a generic ray pixels cross rounding
thresholds one at a time, so the realised ε lands just under the request (the gap is a few levels²
of ``Σ k²``, relative ~1e-4 at ε = 1 on 3×224×224). Clipping is inside the search, so saturated
images still get their full budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from itloop.stimulus.quantisation import LEVELS, check_levels, max_sum_sq_levels, realised_eps_l2

__all__ = ["ControlResult", "gaussian_noise_control", "interpolation_control"]

_DIMS = (1, 2, 3)
_HALVINGS = 48


@dataclass(frozen=True)
class ControlResult:
    """Control stimuli, per row, on the CPU.

    kind: "gaussian" or "interpolation"; delta_levels: (B, C, H, W) int16 level changes;
    eps_l2, realised_eps_l2: (B,) float64 requested and realised L2 in [0, 1] units; scale: (B,) the
    ray parameter found (noise multiplier, or the mixing coefficient α of (1 − α)·x + α·y).
    """

    kind: str
    delta_levels: Tensor
    eps_l2: Tensor
    realised_eps_l2: Tensor
    scale: Tensor

    def stimulus_levels(self, clean_levels: Tensor) -> Tensor:
        """(B, C, H, W) uint8 clean images -> (B, C, H, W) uint8 control stimuli."""
        return (clean_levels.to(torch.int16) + self.delta_levels).to(torch.uint8)


def _levels_at(base: Tensor, direction: Tensor, s: Tensor) -> Tensor:
    """Integer change of round(clip(x + s·d)) from x, in levels; base = x·255 (fp32)."""
    target = (base + s.view(-1, 1, 1, 1) * direction * LEVELS).clamp(0.0, float(LEVELS))
    return (torch.round(target) - base).to(torch.int16)


def _largest_fitting_scale(
    clean_levels: Tensor, direction: Tensor, eps_l2: Tensor, s_max: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(B,) largest ray scale whose quantised change fits ε, and that (B, C, H, W) int16 change."""
    base = clean_levels.float()
    d = direction.float()
    budget = max_sum_sq_levels(eps_l2).to(base.device)

    def fits(s: Tensor) -> Tensor:
        return _levels_at(base, d, s).to(torch.int64).square().sum(_DIMS) <= budget

    lo = torch.zeros(base.shape[0], device=base.device)
    if s_max is None:
        norm = d.square().sum(_DIMS).sqrt().clamp_min(1e-30)
        hi = (eps_l2.to(base.device).float() / norm).clamp_min(1e-12)
        for _ in range(64):
            ok = fits(hi)
            if not bool(ok.any()):
                break
            lo = torch.where(ok, hi, lo)
            hi = torch.where(ok, hi * 2, hi)
    else:
        hi = s_max.to(base.device).float()
        ok = fits(hi)
        lo = torch.where(ok, hi, lo)
    for _ in range(_HALVINGS):
        mid = (lo + hi) / 2
        ok = fits(mid)
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    k = _levels_at(base, d, lo)
    check_levels(clean_levels, k, budget)
    return lo, k


def _eps_rows(eps_l2: Tensor | float, n: int) -> Tensor:
    eps = torch.as_tensor(eps_l2, dtype=torch.float64).flatten()
    if eps.numel() == 1:
        eps = eps.expand(n)
    if eps.shape != (n,) or not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
        raise ValueError(f"eps_l2 must be one or {n} finite values >= 0, got {eps.tolist()!r}")
    return eps


def _check_images(name: str, levels: Tensor) -> None:
    if levels.dtype != torch.uint8 or levels.ndim != 4:
        raise ValueError(
            f"{name} must be (B, C, H, W) uint8, got {tuple(levels.shape)} {levels.dtype}"
        )


def gaussian_noise_control(
    clean_levels: Tensor, eps_l2: Tensor | float, *, generator: torch.Generator
) -> ControlResult:
    """i.i.d. Gaussian noise, clipped and quantised, scaled to the largest realised L2 ≤ ε.

    clean_levels: (B, C, H, W) uint8; eps_l2: scalar or (B,); generator seeds the noise (drawn on
    the generator's device, then moved to the images').
    """
    _check_images("clean_levels", clean_levels)
    eps = _eps_rows(eps_l2, clean_levels.shape[0])
    noise = torch.randn(clean_levels.shape, generator=generator, device=generator.device).to(
        clean_levels.device
    )
    scale, k = _largest_fitting_scale(clean_levels, noise, eps, None)
    return ControlResult("gaussian", k.cpu(), eps, realised_eps_l2(k).cpu(), scale.double().cpu())


def interpolation_control(
    clean_levels: Tensor, other_levels: Tensor, eps_l2: Tensor | float
) -> ControlResult:
    """(1 − α)·x + α·y toward another image y (of another class), α the largest whose 8-bit image
    fits ε.

    clean_levels, other_levels: (B, C, H, W) uint8; eps_l2: scalar or (B,). α ≤ 1: when y itself is
    within ε the stimulus is y and the realised ε is ‖y − x‖ (< requested; recorded as such).
    """
    _check_images("clean_levels", clean_levels)
    _check_images("other_levels", other_levels)
    if other_levels.shape != clean_levels.shape:
        raise ValueError(
            f"other_levels {tuple(other_levels.shape)} must match clean {tuple(clean_levels.shape)}"
        )
    eps = _eps_rows(eps_l2, clean_levels.shape[0])
    direction = (other_levels.float() - clean_levels.float()) / LEVELS
    same = direction.abs().sum(_DIMS) == 0
    if bool(same.any()):
        raise ValueError(
            f"rows {torch.nonzero(same).flatten().tolist()} interpolate toward themselves"
        )
    ones = torch.ones(clean_levels.shape[0], device=clean_levels.device)
    alpha, k = _largest_fitting_scale(clean_levels, direction, eps, ones)
    return ControlResult(
        "interpolation", k.cpu(), eps, realised_eps_l2(k).cpu(), alpha.double().cpu()
    )
