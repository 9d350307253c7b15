"""Unit sensitivity (§3.2) on toy units whose sensitivity is known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from itloop.models import build_backbone
from itloop.stimulus.units import PooledUnits, UnitSearch, unit_sensitivity

SMALL = UnitSearch(restarts=2, steps=24, cycles=4, batch_size=64)


class Linear(nn.Module):
    """h(x) = W · flatten(x): s(x, ε) = ε‖w_u‖ while the box is not active."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w.T


class Bowl(nn.Module):
    """h(x) = −(w · (x − x0))²: it can only decrease, by ε²‖w‖² at x0."""

    def __init__(self, w: Tensor, x0: Tensor) -> None:
        super().__init__()
        self.w, self.x0 = nn.Parameter(w), nn.Parameter(x0)

    def forward(self, x: Tensor) -> Tensor:
        return -(((x - self.x0).flatten(1) @ self.w[:, None]) ** 2)


def test_linear_units_reach_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3 * 8 * 8, generator=g)
    images = torch.full((2, 3, 8, 8), 0.5)
    result = unit_sensitivity(Linear(w), images, 0.3, search=SMALL, generator=g)
    expected = 0.3 * w.norm(dim=1)
    assert torch.allclose(result.change, expected.expand(2, 3), rtol=1e-3)
    assert bool((result.change <= expected * (1 + 1e-4)).all())


def test_both_signs_are_searched() -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((1, 3, 4, 4), 0.5)
    w = torch.randn(3 * 4 * 4, generator=g)
    result = unit_sensitivity(Bowl(w, x0), x0.clone(), 0.2, search=SMALL, generator=g)
    assert float(result.change[0, 0]) == pytest.approx(0.04 * float(w.square().sum()), rel=2e-3)


def test_a_registered_backbone_and_reproducibility() -> None:
    units = PooledUnits(build_backbone("tiny", seed=3))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pick = torch.tensor([0, 5])
    a = unit_sensitivity(
        units, images, 0.1, units=pick, search=SMALL, generator=torch.Generator().manual_seed(9)
    )
    b = unit_sensitivity(
        units, images, 0.1, units=pick, search=SMALL, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(a.change, b.change)
    assert a.change.shape == (3, 2)
    assert bool((a.change > 0).all())
    bigger = unit_sensitivity(
        units, images, 0.4, units=pick, search=SMALL, generator=torch.Generator().manual_seed(9)
    )
    assert bool((bigger.normalised > a.normalised).all())


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="eps_l2 0"):
        unit_sensitivity(
            Linear(torch.ones(1, 3)), torch.zeros(1, 3, 1, 1), 0, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match="restarts 0"):
        UnitSearch(restarts=0)


def test_bench_units_command_prints_figures() -> None:
    import json

    from typer.testing import CliRunner

    from itloop.cli import app

    result = CliRunner().invoke(
        app,
        [
            "bench",
            "units",
            "--backbone",
            "tiny",
            "--px",
            "32",
            "--images",
            "3",
            "--units",
            "2",
            "--restarts",
            "1",
            "--steps",
            "4",
            "--eps",
            "0.1,0.4",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert [r["eps_l2"] for r in figures["results"]] == [0.1, 0.4]
    assert figures["results"][1]["mean_normalised"] > figures["results"][0]["mean_normalised"]
