"""The synthetic monkey's IT: a ground-truth population unlike the model being fitted.

A fixed network (a registered backbone with its own weights and a planted factorized readout)
drives N sites; each site turns its drive into an evoked firing rate with its own gain and
baseline, in a realistic range (tens to a few hundred Hz). The rates are what a recording's
spikes are drawn from (see ``itloop.rig_client.synthetic``); the expected spike count in a
window is what a white-box attack on the truth measures.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from itloop.models.it_model import ITModel

__all__ = ["SyntheticIT", "TruthConfig", "perturbed_backbone_state"]


@dataclass(frozen=True)
class TruthConfig:
    """How the ground truth is drawn; every figure is per site unless it says otherwise."""

    backbone: str = "tiny"
    input_px: int = 64
    n_sites: int = 16
    seed: int = 2024
    baseline_hz: tuple[float, float] = (5.0, 30.0)
    gain_hz: tuple[float, float] = (40.0, 200.0)
    drift_per_day: float = 0.0
    dead_sites: tuple[int, ...] = ()


class SyntheticIT(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (B, N) evoked firing rates in Hz above baseline."""

    baseline_hz: Tensor
    gain_hz: Tensor
    centre: Tensor
    scale: Tensor
    alive: Tensor

    def __init__(self, config: TruthConfig) -> None:
        super().__init__()
        self.config = config
        px = config.input_px
        self.net = ITModel.build(
            config.backbone,
            config.n_sites,
            input_hw=(px, px),
            seed=config.seed,
            readout_init="scaled",
        ).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(config.seed + 17)
        lo, hi = config.baseline_hz
        self.register_buffer(
            "baseline_hz", lo + (hi - lo) * torch.rand(config.n_sites, generator=g)
        )
        lo, hi = config.gain_hz
        self.register_buffer("gain_hz", lo + (hi - lo) * torch.rand(config.n_sites, generator=g))
        self.register_buffer("centre", torch.zeros(config.n_sites))
        self.register_buffer("scale", torch.ones(config.n_sites))
        alive = torch.ones(config.n_sites)
        for site in config.dead_sites:
            alive[site] = 0.0
        self.register_buffer("alive", alive)
        self.day = 0

    @torch.no_grad()
    def calibrate(self, images: Tensor) -> None:
        """Centre and scale each site's drive on (B, 3, H, W) reference images."""
        drive: Tensor = self.net(images)
        self.centre.copy_(drive.mean(0))
        self.scale.copy_(drive.std(0).clamp(min=1e-6))

    def gains(self) -> Tensor:
        """(N,) today's gains in Hz (with the configured slow drift)."""
        return self.gain_hz * (1.0 + self.config.drift_per_day * self.day) * self.alive

    def forward(self, images: Tensor) -> Tensor:
        drive: Tensor = self.net(images)
        z = (drive - self.centre) / self.scale
        rates: Tensor = self.gains() * nn.functional.softplus(z) / 2.0
        return rates

    def rates_hz(self, images: Tensor) -> Tensor:
        """(B, N) total firing rate while the image drives the site (baseline included)."""
        evoked: Tensor = self(images)
        return self.baseline_hz * self.alive + evoked

    def backbone(self) -> nn.Module:
        return self.net.backbone


def perturbed_backbone_state(
    truth: SyntheticIT, relative_noise: float, seed: int
) -> dict[str, Tensor]:
    """The truth's trunk with Gaussian noise of ``relative_noise`` × each tensor's s.d.

    This is the day-0 backbone of the model being fitted: features already IT-like, as the
    paper's robust backbone, but not the truth's. Keys are those of a plain state dict of the
    architecture (a checkpoint file the lab could provide).
    """
    g = torch.Generator().manual_seed(seed)
    trunk = copy.deepcopy(truth.net.backbone)
    state = {}
    for full_name, value in trunk.state_dict().items():
        name = full_name.removeprefix("trunk.")
        if value.is_floating_point() and value.numel() > 1 and "running" not in name:
            noise = torch.randn(value.shape, generator=g) * value.std() * relative_noise
            state[name] = (value + noise).contiguous()
        else:
            state[name] = value.clone().contiguous()
    return state
