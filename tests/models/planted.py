"""Synthetic data with a known answer: images, a planted model of IT and Poisson trials."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from itloop.models import ArrayTrialDataset, FactorizedReadout, build_backbone


def grating_images(n: int, hw: int, rng: np.random.Generator) -> NDArray[np.uint8]:
    """(n, 3, hw, hw) uint8 images: four coloured Gabor patches each, random place and angle."""
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    out = np.full((n, 3, hw, hw), 0.5)
    for i in range(n):
        for _ in range(4):
            theta, freq, phase = (
                rng.uniform(0, np.pi),
                rng.uniform(2, 16),
                rng.uniform(0, 2 * np.pi),
            )
            cy, cx = rng.uniform(0, 1, 2)
            size = rng.uniform(0.1, 0.4)
            envelope = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * size**2))
            wave = np.cos(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
            out[i] += 0.25 * rng.normal(size=(3, 1, 1)) * wave * envelope
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PlantedData:
    """Trials drawn from a known model: Poisson counts around known per-image rates."""

    dataset: ArrayTrialDataset
    rates: NDArray[np.float64]  # (M, N) true rate per image and site
    planted: FactorizedReadout
    hw: int
    repeats: int


def make_planted(
    *, n_images: int = 600, n_sites: int = 8, repeats: int = 2, hw: int = 64, seed: int = 0
) -> PlantedData:
    """Frozen tiny backbone (seed 0) + a planted FactorizedReadout with Gaussian masks."""
    rng = np.random.default_rng(seed)
    images = grating_images(n_images, hw, rng)
    backbone = build_backbone("tiny", seed=0).eval()
    c, h, w = backbone.out_shape((hw, hw))
    planted = FactorizedReadout(
        (c, h, w), n_sites, "scaled", generator=torch.Generator().manual_seed(7)
    )
    yy, xx = np.mgrid[0:h, 0:w]
    with torch.no_grad():
        for n in range(n_sites):
            cy, cx = rng.uniform(1, h - 2), rng.uniform(1, w - 2)
            mask = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.2**2))
            planted.spatial[n] = torch.from_numpy(mask / mask.sum()).float()
        feats = backbone(torch.from_numpy(images).float() / 255)
        drive = planted(feats).double().numpy()
    z = (drive - drive.mean(0)) / drive.std(0)
    rates = np.clip(6.0 + 2.0 * z, 0.05, None)
    image_ids = np.repeat(np.arange(n_images), repeats)
    counts = rng.poisson(rates[image_ids]).astype(np.float32)
    return PlantedData(ArrayTrialDataset(images, image_ids, counts), rates, planted, hw, repeats)
