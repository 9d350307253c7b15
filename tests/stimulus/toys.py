"""Small models with known answers, shared by the stimulus tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearSites(nn.Module):
    """f(x) = W·x + b as one full-size Conv2d: (B, C, H, W) -> (B, N); its optimum is known."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        n, c, h, w = weight.shape
        self.conv = nn.Conv2d(c, n, (h, w), bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias if bias is not None else torch.zeros(n))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N)."""
        return self.conv(x).flatten(1)


class ReluSites(nn.Module):
    """Site 0: relu(w·x + b) (easy up, floored down); site 1: −relu(w·x + b) (easy down)."""

    def __init__(self, weight: Tensor, bias: float) -> None:
        super().__init__()
        self.lin = LinearSites(weight.unsqueeze(0), torch.tensor([bias]))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 2)."""
        r = torch.relu(self.lin(x))
        return torch.cat([r, -r], dim=1)


class TinyConvNet(nn.Module):
    """A small conv net with BatchNorm, a residual add and N linear sites."""

    def __init__(self, n_sites: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, n_sites)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for bn in (self.bn0, self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N)."""
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(h)))
        out: Tensor = self.head(h.mean(dim=(2, 3)))
        return out


def on_grid(x: Tensor) -> Tensor:
    """Round images to the 8-bit grid."""
    return torch.round(x * 255) / 255


def sharding_job() -> tuple[nn.Module, Tensor, object, object]:
    """The (model, images, rows, config) that the sharding test runs in one and in two processes."""
    from itloop.stimulus import AttackConfig, AttackRows

    model = TinyConvNet(n_sites=3, seed=1)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    rows = AttackRows.grid([0, 1, 2, 0], [0, 1, 2, 1], [0.5, 1.0])
    config = AttackConfig(steps=4, batch_size=4, autocast_dtype=None)
    return model, images, rows, config


def step_case(
    rows: int, shape: tuple[int, int, int], device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, Tensor]:
    """Operands of one PGD step where every branch of the projection is taken: saturated images
    (the box clips), a small step that fits whole, a zero gradient, improving and not improving
    iterates. Returns keyword arguments of ``attacks._pgd_step`` (without iterations, keep_best).
    """
    from itloop.stimulus.constraints import random_start_l2_box

    g = torch.Generator().manual_seed(seed)
    x = on_grid(torch.rand(rows, *shape, generator=g))
    x[: rows // 2] = (x[: rows // 2] > 0.5).float()  # every pixel at an edge of the box
    eps = torch.linspace(0.25, 4.0, rows)
    alpha = eps / 3
    alpha[1] = eps[1] * 1e-4  # the clipped step fits inside the ball
    delta = random_start_l2_box(
        x, eps, torch.randn(x.shape, generator=g), torch.rand(rows, generator=g), iterations=None
    )
    grad = torch.randn(x.shape, generator=g)
    grad[2] = 0.0
    val = torch.randn(rows, generator=g)
    sign = torch.where(torch.rand(rows, generator=g) > 0.5, 1.0, -1.0)
    best_obj = torch.where(torch.arange(rows) % 3 == 0, -torch.inf, sign * val + 0.1)
    best_obj[1::4] = sign[1::4] * val[1::4] - 0.1
    case = {
        "x": x,
        "delta": delta,
        "grad": grad,
        "val": val,
        "sign": sign,
        "eps": eps,
        "alpha": alpha,
        "best_obj": best_obj,
        "best_val": torch.randn(rows, generator=g),
        "best_delta": torch.randn(x.shape, generator=g),
    }
    return {k: v.to(device) for k, v in case.items()}
