"""Every quantised perturbation respects its ε in integers; gradient guidance beats rounding."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itloop.stimulus import (
    from_levels,
    max_sum_sq_levels,
    project_l2_box,
    quantise,
    quantise_perturbation,
    realised_eps_l2,
    to_levels,
)
from itloop.stimulus.quantisation import perturbed_levels

SHAPE = (3, 6, 6)


def _clean(seed: int, n: int, saturation: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lv = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    mask = torch.rand(n, *SHAPE, generator=g) < saturation
    ends = (torch.rand(n, *SHAPE, generator=g) < 0.5).to(torch.uint8) * 255
    return torch.where(mask, ends, lv)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    eps=st.floats(0.0, 2.0),
    overshoot=st.floats(0.0, 3.0),
    saturation=st.floats(0.0, 1.0),
    with_grad=st.booleans(),
)
def test_realised_eps_never_exceeds_the_request(
    seed: int, eps: float, overshoot: float, saturation: float, with_grad: bool
) -> None:
    n = 4
    clean = _clean(seed, n, saturation)
    g = torch.Generator().manual_seed(seed + 1)
    d = torch.randn(n, *SHAPE, generator=g)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * overshoot
    grad = torch.randn(n, *SHAPE, generator=g) if with_grad else None
    eps_rows = torch.full((n,), eps, dtype=torch.float64)
    k = quantise_perturbation(clean, d, grad, eps_rows)
    new = clean.to(torch.int16) + k
    assert int(new.min()) >= 0
    assert int(new.max()) <= 255
    sum_sq = k.to(torch.int64).square().flatten(1).sum(dim=1)
    for s in sum_sq.tolist():
        assert math.sqrt(s) / 255 <= eps
    assert bool((realised_eps_l2(k) <= eps_rows).all())


def test_integer_budget_is_the_largest_that_fits() -> None:
    eps = torch.tensor([0.0, 0.5, 1.0, 1 / 255, 2.5, 10.0], dtype=torch.float64)
    s = max_sum_sq_levels(eps)
    for e, si in zip(eps.tolist(), s.tolist(), strict=True):
        assert math.sqrt(si) / 255 <= e
        assert math.sqrt(si + 1) / 255 > e
    assert s.tolist()[3] == 1


def test_gradient_guided_search_beats_round_and_trim_on_a_linear_objective() -> None:
    g = torch.Generator().manual_seed(3)
    n = 16
    clean = _clean(3, n, 0.3)
    w = torch.randn(n, *SHAPE, generator=g)
    eps = torch.full((n,), 0.05, dtype=torch.float64)  # ~1 level per pixel: rounding matters
    x = from_levels(clean)
    # the continuous optimum of w·δ in ball ∩ box
    delta = project_l2_box(x, w * 100, eps.float())
    guided = quantise_perturbation(clean, delta, w, eps)
    plain = quantise_perturbation(clean, delta, None, eps)
    gain_guided = (guided.float() * w).flatten(1).sum(dim=1)
    gain_plain = (plain.float() * w).flatten(1).sum(dim=1)
    assert bool((gain_guided >= gain_plain - 1e-4).all())
    assert float(gain_guided.mean()) > float(gain_plain.mean())
    assert float((realised_eps_l2(guided) / eps).min()) > 0.9


def test_levels_round_trip_exactly() -> None:
    lv = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_levels(from_levels(lv)), lv)
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    q = quantise(x)
    assert float((q - x).abs().max()) <= 0.5 / 255 + 1e-7
    assert torch.equal(quantise(q), q)


def test_perturbed_levels_add_the_changes_to_the_clean_image() -> None:
    clean = np.array([[0, 10, 255], [128, 1, 254]], dtype=np.uint8)
    k = np.array([[5, -10, 0], [-128, 254, 1]], dtype=np.int16)
    out = perturbed_levels(clean, k)
    assert out.dtype == np.uint8
    assert out.tolist() == [[5, 0, 255], [0, 255, 255]]
    assert clean.tolist() == [[0, 10, 255], [128, 1, 254]]  # the clean image is left as it was
