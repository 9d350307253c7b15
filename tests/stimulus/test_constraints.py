"""The ball ∩ box projection is the Euclidean projection; random starts are uniform and feasible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itloop.stimulus import AttackConfig, L2Ball, project_l2_box, random_start_l2_box
from itloop.stimulus.constraints import project_l2_box_rows, project_l2_box_step

SHAPE = (3, 4, 4)


def dykstra(x: np.ndarray, v: np.ndarray, eps: float, iters: int = 20000) -> np.ndarray:
    """Projection onto ball ∩ box by Dykstra's alternating projections, float64 (independent)."""
    lo, hi = -x, 1.0 - x
    y = v.copy()
    p = np.zeros_like(v)
    q = np.zeros_like(v)
    for _ in range(iters):
        a = np.clip(y + p, lo, hi)
        p = y + p - a
        b = a + q
        n = np.linalg.norm(b)
        y_new = b if n <= eps else b * (eps / n)
        q = a + q - y_new
        if np.abs(y_new - y).max() < 1e-13:
            y = y_new
            break
        y = y_new
    return y


def scale_then_clip(x: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    n = v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
    scaled = v * torch.clamp(eps / n, max=1.0)
    return (x + scaled).clamp(0, 1) - x


def saturated_image(rng: np.random.Generator, frac: float) -> np.ndarray:
    x = rng.random(SHAPE)
    mask = rng.random(SHAPE) < frac
    x[mask] = rng.choice([0.0, 1.0], size=int(mask.sum()))
    return x


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    frac=st.floats(0.0, 1.0),
    eps=st.floats(0.01, 3.0),
    scale=st.floats(0.1, 10.0),
)
def test_projection_matches_dykstra_reference(
    seed: int, frac: float, eps: float, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    x = saturated_image(rng, frac)
    v = rng.normal(size=SHAPE) * scale * eps / np.sqrt(np.prod(SHAPE))
    ref = dykstra(x, v, eps)
    got = (
        project_l2_box(
            torch.tensor(x, dtype=torch.float32)[None],
            torch.tensor(v, dtype=torch.float32)[None],
            eps,
        )[0]
        .double()
        .numpy()
    )
    assert np.abs(got - ref).max() <= 2e-5 * max(1.0, eps)
    assert np.linalg.norm(got) <= eps * (1 + 1e-6)
    assert (x + got).min() >= -1e-6
    assert (x + got).max() <= 1 + 1e-6


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.05, 2.0), iters=st.integers(1, 6))
def test_fixed_iterations_are_always_feasible_and_no_worse_than_scale_then_clip(
    seed: int, eps: float, iters: int
) -> None:
    rng = np.random.default_rng(seed)
    x = torch.tensor(np.stack([saturated_image(rng, 0.7) for _ in range(4)]), dtype=torch.float32)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * eps
    got = project_l2_box(x, v, eps, iterations=iters)
    assert bool((got.flatten(1).norm(dim=1) <= eps * (1 + 1e-6)).all())
    assert float((x + got).min()) >= -1e-6
    assert float((x + got).max()) <= 1 + 1e-6
    naive = scale_then_clip(x, v, eps)
    dist_got = (got - v).flatten(1).norm(dim=1)
    dist_naive = (naive - v).flatten(1).norm(dim=1)
    assert bool((dist_got <= dist_naive + 1e-5).all())


@pytest.mark.parametrize("frac_saturated", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("eps", [1.0, 4.0, 16.0])
def test_the_default_update_count_reaches_the_exact_projection(
    frac_saturated: float, eps: float
) -> None:
    """What the attack loop uses per step (AttackConfig.projection_iterations) is converged here:
    images at 224 px with up to 99 % of pixels at the box edge, steps pushing outwards. Two
    updates land within 1e-5·ε of the exact projection in the hardest of these cases (90 %
    saturated, ε = 4; one update is 1e-2 away there, three are exact to fp32), always inside."""
    g = torch.Generator().manual_seed(int(eps * 100 + frac_saturated * 10))
    shape = (4, 3, 224, 224)
    x = torch.rand(shape, generator=g)
    x = torch.where(torch.rand(shape, generator=g) < frac_saturated, 1.0, x)
    scale = eps / (3 * 224 * 224) ** 0.5
    v = torch.randn(shape, generator=g).abs() * 3 * scale + torch.randn(shape, generator=g) * scale
    e = torch.full((4,), eps)
    exact = project_l2_box_rows(x, v, e, iterations=None)
    fixed = project_l2_box_rows(x, v, e, iterations=AttackConfig().projection_iterations)
    err = (fixed - exact).flatten(1).norm(dim=1) / eps
    assert float(err.max()) < 2e-5
    assert bool((fixed.flatten(1).norm(dim=1) <= eps * (1 + 1e-6)).all())


def test_saturated_image_keeps_full_budget_where_scale_then_clip_shrinks_it() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.ones(2, *SHAPE)
    x[:, :, :1] = 0.5  # a quarter of the pixels have room both ways, the rest only downwards
    v = torch.randn(2, *SHAPE, generator=g)
    eps = 1.0
    ours = project_l2_box(x, v, eps)
    naive = scale_then_clip(x, v, eps)
    assert torch.allclose(ours.flatten(1).norm(dim=1), torch.full((2,), eps), rtol=1e-5)
    assert bool((naive.flatten(1).norm(dim=1) < 0.9 * eps).all())
    assert bool(((ours - v).flatten(1).norm(dim=1) < (naive - v).flatten(1).norm(dim=1)).all())


def test_inside_points_and_per_row_radii_are_respected() -> None:
    x = torch.full((3, *SHAPE), 0.5)
    v = torch.full((3, *SHAPE), 0.01)
    eps = torch.tensor([1.0, 0.05, 0.0])
    out = project_l2_box(x, v, eps)
    assert torch.equal(out[0], v[0])
    assert abs(float(out[1].norm()) - 0.05) < 1e-6
    assert float(out[2].abs().max()) == 0.0


def test_random_start_is_uniform_in_the_ball_and_feasible() -> None:
    g = torch.Generator().manual_seed(0)
    n = 20000
    x = torch.full((n, 1, 1, 2), 0.5)
    eps = 0.1
    ball = L2Ball(eps)
    start = ball.random_start(x, torch.randn(n, 1, 1, 2, generator=g), torch.rand(n, generator=g))
    r2 = start.flatten(1).square().sum(dim=1) / eps**2
    # uniform in a 2-d disc: r² ~ U(0, 1), angle uniform
    assert abs(float(r2.mean()) - 0.5) < 0.01
    assert abs(float((r2 < 0.25).float().mean()) - 0.25) < 0.015
    angle = torch.atan2(start[:, 0, 0, 1], start[:, 0, 0, 0])
    assert abs(float((angle > 0).float().mean()) - 0.5) < 0.015
    assert float(r2.max()) <= 1 + 1e-5


def test_random_start_on_a_saturated_image_stays_in_the_box() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(8, *SHAPE)
    start = random_start_l2_box(x, 2.0, torch.randn(8, *SHAPE, generator=g), torch.ones(8))
    assert float(start.min()) >= 0.0
    assert bool((start.flatten(1).norm(dim=1) <= 2.0 * (1 + 1e-6)).all())


def test_bad_budgets_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="-1"):
        L2Ball(-1.0)
    with pytest.raises(ValueError, match="eps_l2"):
        project_l2_box(torch.zeros(2, *SHAPE), torch.zeros(2, *SHAPE), torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("frac_saturated", [0.0, 0.9])
def test_a_step_projected_from_its_sums_is_the_projection_of_the_step(
    frac_saturated: float,
) -> None:
    """project_l2_box_step takes the step's norm from ‖δ‖², ⟨δ, d⟩ and ‖d‖²; its answer is the
    exact projection of δ + α·d/‖d‖, including rows where the step cancels δ (v = 0), rows with no
    direction (d = 0), a gradient so small that (α/‖d‖)² overflows fp32, and rows whose clipped step
    fits whole."""
    g = torch.Generator().manual_seed(int(frac_saturated * 10) + 3)
    shape = (6, 3, 64, 64)
    x = torch.rand(shape, generator=g)
    x = torch.where(torch.rand(shape, generator=g) < frac_saturated, 0.0, x)
    eps = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 50.0])
    delta = project_l2_box_rows(x, torch.randn(shape, generator=g), eps, iterations=None)
    direction = torch.randn(shape, generator=g)
    alpha = eps / 3
    direction[1] = -delta[1]  # the step lands on 0 (when ‖δ‖ = α)
    alpha[1] = float(delta[1].norm())
    direction[2] = 0.0  # no gradient: δ stays
    alpha[4] = 1e-4  # a tiny step from the boundary
    direction[5] *= 2e-19 / direction[5].norm()  # (α/‖d‖)² overflows fp32; the step must not
    expected = project_l2_box_rows(
        x,
        delta
        + alpha.view(-1, 1, 1, 1)
        * direction
        / direction.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1),
        eps,
        iterations=None,
    )
    for iterations in (2, 4):
        got = project_l2_box_step(x, delta, direction, alpha, eps, iterations=iterations)
        err = (got - expected).flatten(1).norm(dim=1) / eps
        assert float(err.max()) < 1e-6, (iterations, err.tolist())
        norms = got.flatten(1).norm(dim=1)
        assert bool((norms <= eps * (1 + 1e-6)).all()), norms.tolist()
        assert float((x + got).min()) >= -1e-7
        assert float((x + got).max()) <= 1 + 1e-7
    assert float(got[1].abs().max()) < 1e-5
    assert torch.allclose(got[2], delta[2], atol=1e-6)


def test_a_step_start_never_exceeds_the_scale_only_point() -> None:
    """The step's first iterate must be feasible: with one update, the norm stays within ε even
    where the cross term ⟨δ, d⟩ nearly cancels ‖δ‖² (the sums' rounding is covered by the
    margin)."""
    g = torch.Generator().manual_seed(11)
    shape = (8, 3, 96, 96)
    x = torch.full(shape, 0.5)
    delta = torch.randn(shape, generator=g) * 1e-3
    eps = delta.flatten(1).norm(dim=1) * 1.0001
    direction = -delta + 1e-4 * torch.randn(shape, generator=g)
    alpha = delta.flatten(1).norm(dim=1) * torch.linspace(0.5, 1.5, 8)
    got = project_l2_box_step(x, delta, direction, alpha, eps, iterations=1)
    assert bool((got.flatten(1).norm(dim=1) <= eps * (1 + 1e-6)).all())
