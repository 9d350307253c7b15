"""White-box adversarial sensitivity of artificial units (Guo et al., §3.2).

s_i(x, ε) = max_{‖δ‖ ≤ ε} |h_i(x) − h_i(x + δ)|, searched as the paper does: both signs of the
change optimised separately; each run first in the ball of radius 2ε, then in the ball of
radius ε; within a phase the step starts at ε and shrinks by 10 % after every step that does not
improve on the best, a schedule restarted from the best point up to 4 times; the best of
``restarts`` random starts. Images stay in the [0, 1] box (the projection is the exact one onto
ball ∩ box). Normalised by σ_i, the unit's s.d. over the clean images, as for IT sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from itloop.stimulus.constraints import project_l2_box, random_start_l2_box
from itloop.stimulus.errors import AttackError

__all__ = ["PooledUnits", "UnitSearch", "UnitSensitivity", "unit_sensitivity"]

_DIMS = (1, 2, 3)


class PooledUnits(nn.Module):
    """(B, 3, H, W) -> (B, C): a feature map averaged over space (ResNets' penultimate layer)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, images: Tensor) -> Tensor:
        out: Tensor = self.features(images)
        return out.mean(dim=(2, 3)) if out.ndim == 4 else out


@dataclass(frozen=True)
class UnitSearch:
    """The search of §3.2; the paper uses 100 restarts × 250 steps per phase."""

    restarts: int = 100
    steps: int = 250
    cycles: int = 4
    shrink: float = 0.9
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.restarts < 1 or self.steps < 1 or self.cycles < 1 or not 0 < self.shrink < 1:
            raise ValueError(
                f"restarts {self.restarts}, steps {self.steps}, cycles {self.cycles} must be >= 1 "
                f"and shrink {self.shrink} in (0, 1)"
            )


@dataclass(frozen=True)
class UnitSensitivity:
    """(M, U) best |Δh| per image and unit at one ε, the unit's σ (U,) and s/σ averaged (U,)."""

    eps_l2: float
    change: Tensor
    sigma: Tensor
    normalised: Tensor


def _objective(model: nn.Module, z: Tensor, unit: Tensor, sign: Tensor, base: Tensor) -> Tensor:
    out: Tensor = model(z)
    return sign * (out.gather(1, unit[:, None]).squeeze(1) - base)


def _phase(
    model: nn.Module,
    x: Tensor,
    delta: Tensor,
    unit: Tensor,
    sign: Tensor,
    base: Tensor,
    radius: Tensor,
    step0: Tensor,
    search: UnitSearch,
) -> tuple[Tensor, Tensor]:
    """One phase of annealed PGD in the ball of ``radius``; returns the best δ and objective."""
    delta = project_l2_box(x, delta, radius)
    with torch.no_grad():
        best_obj = _objective(model, x + delta, unit, sign, base)
    best = delta.clone()
    per_cycle = max(1, search.steps // search.cycles)
    for cycle in range(search.cycles):
        step = step0.clone()
        current = best.clone()
        for _ in range(
            per_cycle if cycle < search.cycles - 1 else search.steps - per_cycle * cycle
        ):
            z = (x + current).detach().requires_grad_(True)
            obj = _objective(model, z, unit, sign, base)
            (grad,) = torch.autograd.grad(obj.sum(), z)
            norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
            moved = current + step.view(-1, 1, 1, 1) * grad / norm
            current = project_l2_box(x, moved, radius, iterations=8)
            with torch.no_grad():
                value = _objective(model, x + current, unit, sign, base)
            improved = value > best_obj
            best = torch.where(improved.view(-1, 1, 1, 1), current, best)
            best_obj = torch.where(improved, value, best_obj)
            step = torch.where(improved, step, step * search.shrink)
    return best, best_obj


def unit_sensitivity(
    model: nn.Module,
    images: Tensor,
    eps_l2: float,
    *,
    units: Tensor | None = None,
    search: UnitSearch | None = None,
    generator: torch.Generator,
) -> UnitSensitivity:
    """The sensitivity of ``units`` of ``model`` at ``eps_l2`` on (M, 3, H, W) images in [0, 1].

    model: (B, 3, H, W) -> (B, U) unit activations (eval mode, no parameter gradients).
    """
    search = search or UnitSearch()
    if images.ndim != 4 or float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError(f"images must be (M, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if not eps_l2 > 0:
        raise ValueError(f"eps_l2 {eps_l2} must be positive")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = images.device
    with torch.no_grad():
        clean = model(images).float()
    n_units = clean.shape[1]
    chosen = torch.arange(n_units, device=device) if units is None else units.to(device)
    m = images.shape[0]
    # rows: image × unit × sign × restart
    img = torch.arange(m, device=device).repeat_interleave(chosen.numel() * 2 * search.restarts)
    unit = chosen.repeat_interleave(2 * search.restarts).repeat(m)
    sign = torch.tensor([1.0, -1.0], device=device).repeat_interleave(search.restarts)
    sign = sign.repeat(m * chosen.numel())
    best = torch.zeros(img.numel(), device=device)
    for start in range(0, img.numel(), search.batch_size):
        sl = slice(start, start + search.batch_size)
        x = images[img[sl]].float()
        u, s = unit[sl], sign[sl]
        base = clean[img[sl], u]
        n = x.shape[0]
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(device)
        radius_u = torch.rand(n, generator=generator, device=generator.device).to(device)
        wide = torch.full((n,), 2.0 * eps_l2, device=device)
        narrow = torch.full((n,), eps_l2, device=device)
        delta = random_start_l2_box(x, wide, noise, radius_u)
        delta, _ = _phase(model, x, delta, u, s, base, wide, narrow, search)
        delta, obj = _phase(model, x, delta, u, s, base, narrow, narrow, search)
        worst = float(delta.flatten(1).norm(dim=1).max())
        if worst > eps_l2 * (1 + 1e-5):
            raise AttackError(f"unit perturbation L2 {worst:.6g} exceeds budget {eps_l2:.6g}")
        best[sl] = obj.clamp(min=0)
    change = best.view(m, chosen.numel(), 2 * search.restarts).amax(dim=2)
    sigma = clean[:, chosen].std(0).clamp(min=1e-12) if m > 1 else torch.ones(chosen.numel())
    return UnitSensitivity(eps_l2, change.cpu(), sigma.cpu(), (change / sigma).mean(0).cpu())
