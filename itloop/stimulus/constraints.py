"""Threat models: the set a perturbation may lie in, separate from the optimiser that searches it.

The set is the intersection of an L2 ball of radius ε around the clean image and the [0, 1] pixel
box: ``{δ : ‖δ‖₂ ≤ ε, 0 ≤ x + δ ≤ 1}``. Its Euclidean projection is not scale-then-clip (that lands
inside the set but not at its nearest point, and shrinks the realised norm on saturated images). By
the KKT conditions the projection of v is ``clip(t·v, −x, 1 − x)`` for the largest ``t ∈ (0, 1]``
whose norm is still ≤ ε, and :func:`project_l2_box` finds that t per row with a monotone active-set
iteration (below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Constraint",
    "L2Ball",
    "project_l2_box",
    "project_l2_box_rows",
    "project_l2_box_step",
    "random_start_l2_box",
]

_REDUCE_DIMS = (1, 2, 3)


class Constraint(Protocol):
    """A feasible set of perturbations around a batch of clean images."""

    def project(self, x: Tensor, v: Tensor) -> Tensor:
        """(B, C, H, W) clean images and candidates -> nearest feasible perturbations."""
        ...

    def random_start(self, x: Tensor, noise: Tensor, radius_u: Tensor) -> Tensor:
        """(B, C, H, W) images, (B, C, H, W) N(0, 1) noise, (B,) U(0, 1) -> feasible starts."""
        ...


def _row_eps(eps_l2: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) radius to a (B,) fp32 tensor on x's device."""
    eps = torch.as_tensor(eps_l2, dtype=torch.float32, device=x.device)
    if eps.ndim == 0:
        eps = eps.expand(x.shape[0])
    if eps.shape != (x.shape[0],):
        raise ValueError(
            f"eps_l2 must be a scalar or shape ({x.shape[0]},), got {tuple(eps.shape)}"
        )
    return eps


def project_l2_box(
    x: Tensor,
    v: Tensor,
    eps_l2: Tensor | float,
    *,
    iterations: int | None = None,
    rtol: float = 1e-6,
) -> Tensor:
    """Euclidean projection of perturbations onto the L2 ball ∩ [0, 1] box, batched over rows.

    x: (B, C, H, W) clean images in [0, 1]; v: (B, C, H, W) candidate perturbations; eps_l2: scalar
    or (B,) radii in [0, 1] image units. Returns (B, C, H, W) perturbations, fp32 like v.

    Per row, the answer is ``clip(t·v, −x, 1 − x)``: t = 1 when the clipped v already fits, else the
    t with norm exactly ε. With ``cap_i`` the room of pixel i in the direction of v_i, the squared
    norm at t is ``t²·A(t) + C(t)`` (A: sum of v_i² over pixels not yet clipped, C: sum of cap_i²
    over clipped ones). Starting from the scale-only t = ε/‖v‖ (feasible: clipping only shortens),
    each update ``t ← sqrt((ε² − C(t)) / A(t))`` solves the quadratic of the current active set.
    Pixels only join the clipped set as t grows, so every iterate is feasible and t rises
    monotonically to the root; it is exact once the active set stops changing. ``iterations=None``
    iterates to ``rtol`` (one host sync per iteration: tests, final steps); an int runs that many
    fused, sync-free updates (the PGD inner loop: always feasible, at most marginally inside the
    optimum).
    """
    if x.shape != v.shape or x.ndim != 4:
        raise ValueError(
            f"x and v must both be (B, C, H, W); got {tuple(x.shape)}, {tuple(v.shape)}"
        )
    eps = _row_eps(eps_l2, x)
    if bool((eps < 0).any()):
        raise ValueError(f"eps_l2 must be >= 0, got minimum {float(eps.min()):.4g}")
    return project_l2_box_rows(x, v, eps, iterations=iterations, rtol=rtol)


def project_l2_box_rows(
    x: Tensor,
    v: Tensor,
    eps: Tensor,
    *,
    iterations: int | None,
    rtol: float = 1e-6,
    norm_sq_upper: Tensor | None = None,
) -> Tensor:
    """:func:`project_l2_box` without validation, for the compiled inner loop; eps: (B,) fp32.

    norm_sq_upper: (B,) an upper bound on ‖v‖² known without a pass over v (None: computed). The
    iteration starts from ``t = ε / sqrt(norm_sq_upper)``, feasible because it is at most the
    scale-only t; whether the clipped v fits whole is found in the first update's pass.
    """
    v = v.float()
    cap = torch.where(v >= 0, 1.0 - x, x).clamp_min(0.0)
    a = v.abs()
    v_sq = a.square()
    if norm_sq_upper is None:
        norm_sq_upper = v_sq.sum(_REDUCE_DIMS)
    t = torch.where(
        norm_sq_upper > 0,
        eps / norm_sq_upper.sqrt().clamp_min(1e-30),
        torch.ones_like(eps),
    )
    t = t.clamp(max=1.0)
    inside: Tensor | None = None
    steps = 0
    while True:
        clipped = (t.view(-1, 1, 1, 1) * a) > cap
        a_sum = torch.where(clipped, 0.0, v_sq).sum(_REDUCE_DIMS)
        c_sum = torch.where(clipped, cap.square(), 0.0).sum(_REDUCE_DIMS)
        if inside is None:  # read in the same pass as the first update's sums
            inside = torch.minimum(a, cap).square().sum(_REDUCE_DIMS) <= eps.square()
        t_new = ((eps.square() - c_sum).clamp_min(0.0) / a_sum.clamp_min(1e-30)).sqrt()
        t_new = torch.maximum(t, t_new).clamp(max=1.0)
        steps += 1
        if iterations is not None:
            t = t_new
            if steps >= iterations:
                break
            continue
        converged = bool(((t_new - t) <= rtol * t_new).all())
        t = t_new
        if converged or steps >= 10_000:
            break
    t = torch.where(inside, torch.ones_like(t), t)
    out = torch.minimum(t.view(-1, 1, 1, 1) * a, cap)
    return torch.copysign(out, v)


def project_l2_box_step(
    x: Tensor,
    delta: Tensor,
    direction: Tensor,
    alpha: Tensor,
    eps: Tensor,
    *,
    iterations: int,
) -> Tensor:
    """One normalised step projected: Π(δ + α·d/‖d‖) onto ball(ε) ∩ box, for the compiled loop.

    x, delta, direction: (B, C, H, W) fp32; alpha, eps: (B,) fp32. Where d = 0 the step is δ
    itself projected.

    The step's norm needs no pass of its own: ``‖δ + s·d‖² = ‖δ‖² + 2s⟨δ, d⟩ + α²`` with
    ``s = α/‖d‖``, and ‖d‖², ⟨δ, d⟩ and ‖δ‖² are read in one pass over δ and d. The start of the
    active-set iteration must not exceed the scale-only t (that keeps every iterate feasible), so
    the norm is bounded from above by a margin that covers the rounding of the cross term. Passes
    over the batch: the three sums, one per update (the first also decides whether the clipped
    step fits whole), and the output.
    """
    d_sq = delta.square().sum(_REDUCE_DIMS)
    cross = (delta * direction).sum(_REDUCE_DIMS)
    dir_sq = direction.square().sum(_REDUCE_DIMS)
    # ‖s·d‖² is α² (0 where d = 0), not s²·‖d‖²: s² overflows fp32 for gradients below ~1e-19
    has_direction = dir_sq > 0
    s = torch.where(has_direction, alpha / dir_sq.clamp_min(_FLT_MIN).sqrt(), 0.0)
    step_sq = torch.where(has_direction, alpha.square(), 0.0)
    norm_sq = d_sq + 2.0 * s * cross + step_sq
    magnitude = d_sq + 2.0 * s * cross.abs() + step_sq
    upper = norm_sq.clamp_min(0.0) + _STEP_NORM_MARGIN * magnitude
    v = delta + s.view(-1, 1, 1, 1) * direction
    return project_l2_box_rows(x, v, eps, iterations=iterations, norm_sq_upper=upper)


_FLT_MIN = torch.finfo(torch.float32).tiny
"""The smallest normal fp32: ‖d‖² below it (subnormal) is raised to it, which only shortens the
step; it keeps α/‖d‖ finite."""

_STEP_NORM_MARGIN = 1e-5
"""Relative margin on ‖δ + s·d‖² computed from its three sums: fp32 sums over a 224×224 image are
good to ~1e-6 of the terms' magnitudes, so the bound stays above the norm. Where the terms do not
cancel it moves the start of the iteration by about 5e-6 of t, which the first update recovers."""


def random_start_l2_box(
    x: Tensor,
    eps_l2: Tensor | float,
    noise: Tensor,
    radius_u: Tensor,
    *,
    iterations: int | None = None,
) -> Tensor:
    """Uniform random point of the L2 ball, projected onto ball ∩ box.

    x: (B, C, H, W) clean images; noise: (B, C, H, W) N(0, 1) draws (direction); radius_u: (B,) U(0,
    1) draws; the radius is ε·U^(1/d) with d = C·H·W, which makes the point uniform in the ball.
    Returns (B, C, H, W) fp32 perturbations.
    """
    eps = _row_eps(eps_l2, x)
    d = x[0].numel()
    norm = noise.float().square().sum(_REDUCE_DIMS).sqrt().clamp_min(1e-30)
    radius = eps * radius_u.float().clamp(0.0, 1.0).pow(1.0 / d)
    start = noise.float() * (radius / norm).view(-1, 1, 1, 1)
    return project_l2_box(x, start, eps, iterations=iterations)


@dataclass(frozen=True)
class L2Ball:
    """L2 ball of radius ``eps_l2`` (scalar or one per row) ∩ the [0, 1] pixel box."""

    eps_l2: Tensor | float
    iterations: int | None = None

    def __post_init__(self) -> None:
        eps = torch.as_tensor(self.eps_l2)
        if eps.numel() == 0 or bool((eps < 0).any()) or not bool(torch.isfinite(eps).all()):
            raise ValueError(f"eps_l2 must be finite and >= 0, got {self.eps_l2!r}")

    def project(self, x: Tensor, v: Tensor) -> Tensor:
        """(B, C, H, W) clean images and candidates -> nearest feasible perturbations."""
        return project_l2_box(x, v, self.eps_l2, iterations=self.iterations)

    def random_start(self, x: Tensor, noise: Tensor, radius_u: Tensor) -> Tensor:
        """(B, C, H, W) images, (B, C, H, W) N(0, 1) noise, (B,) U(0, 1) -> feasible starts."""
        return random_start_l2_box(x, self.eps_l2, noise, radius_u, iterations=self.iterations)
