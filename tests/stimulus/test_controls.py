"""Model-free controls reach (just under) the requested ε after clipping and quantisation."""

from __future__ import annotations

import pytest
import torch

from itloop.stimulus import gaussian_noise_control, interpolation_control

SHAPE = (3, 32, 32)


def _levels(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("eps", [0.25, 1.0, 4.0])
def test_gaussian_noise_realises_eps_from_below(eps: float) -> None:
    clean = _levels(0, 4)
    clean[1] = 255  # saturated white: only half the noise has room, the budget is still met
    clean[2] = 0
    out = gaussian_noise_control(clean, eps, generator=torch.Generator().manual_seed(5))
    assert bool((out.realised_eps_l2 <= eps).all())
    assert float(out.realised_eps_l2.min()) >= 0.995 * eps
    stim = out.stimulus_levels(clean)
    assert torch.equal(stim.to(torch.int16) - clean.to(torch.int16), out.delta_levels)
    again = gaussian_noise_control(clean, eps, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.delta_levels, out.delta_levels)
    other = gaussian_noise_control(clean, eps, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other.delta_levels, out.delta_levels)


def test_interpolation_lies_on_the_segment_at_eps() -> None:
    clean, other = _levels(1, 3), _levels(2, 3)
    eps = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    out = interpolation_control(clean, other, eps)
    assert bool((out.realised_eps_l2 <= eps).all())
    assert float((out.realised_eps_l2 / eps).min()) >= 0.995
    alpha = out.scale.float().view(-1, 1, 1, 1)
    expected = (1 - alpha) * clean.float() + alpha * other.float()
    assert float((out.stimulus_levels(clean).float() - expected).abs().max()) <= 0.5 + 1e-3
    assert bool((out.scale > 0).all() & (out.scale < 1).all())


def test_interpolation_stops_at_the_other_image_when_it_is_within_eps() -> None:
    clean = _levels(3, 1)
    other = clean.clone()
    other[0, 0, 0, :4] = (other[0, 0, 0, :4].to(torch.int16) ^ 1).to(torch.uint8)
    out = interpolation_control(clean, other, 1.0)
    assert float(out.scale[0]) == 1.0
    assert torch.equal(out.stimulus_levels(clean), other)
    with pytest.raises(ValueError, match="toward themselves"):
        interpolation_control(clean, clean, 1.0)
