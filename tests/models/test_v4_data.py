"""Real data: the readout fitted on Cowley et al.'s V4 session 210325, read next to its ceiling.

The backbone is a randomly initialised ResNet-18 cut at layer2 (no pretrained weights can be
downloaded here), frozen; only the factorized readout is fitted, on 112×112 images.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itloop.analysis.reliability import split_half_reliability
from itloop.models import ArrayTrialDataset, FitConfig, ITModel, fit

V4 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "v4_cowley_210325"


@pytest.mark.slow
def test_readout_on_v4_reaches_part_of_the_noise_ceiling() -> None:
    files = [V4 / n for n in ("images_210325.zip", "raw_210325.npy")]
    if not all(f.is_file() for f in files):
        pytest.skip(f"the V4 data set is not at {V4.resolve()} (needs {[f.name for f in files]})")
    raw = np.load(V4 / "raw_210325.npy")  # (N sites, M images, R repeats), NaN = no repeat
    with zipfile.ZipFile(V4 / "images_210325.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        images = np.stack(
            [np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB")) for n in names]
        ).transpose(0, 3, 1, 2)
    n_sites, n_images, _ = raw.shape
    assert images.shape == (n_images, 3, 112, 112)
    image_ids, repeat = np.nonzero(np.isfinite(raw).any(axis=0))
    dataset = ArrayTrialDataset(
        np.ascontiguousarray(images), image_ids, raw[:, image_ids, repeat].T.astype(np.float32)
    )

    reliability = split_half_reliability(raw, n_splits=50, seed=0)
    model = ITModel.build(
        "resnet18", n_sites, layer="layer2", input_hw=(112, 112), readout_init="scaled"
    )
    config = FitConfig(freeze_backbone=True, max_epochs=40, patience=5, lr=1e-2, l1=1e-2)
    result = fit(model, dataset, config)

    median_r = float(np.nanmedian(result.site_r))
    ceiling = float(np.nanmedian(reliability.ceiling_r))
    print(
        f"V4 210325: {n_sites} sites, {result.metrics['n_val_images']} held-out images; median "
        f"held-out r {median_r:.3f}; split-half ceiling √ρ {ceiling:.3f} "
        f"(Spearman-Brown ρ {np.nanmedian(reliability.spearman_brown):.3f}); "
        f"best epoch {result.metrics['best_epoch']}"
    )
    assert 0.2 < median_r < ceiling
    below = np.isfinite(result.site_r) & np.isfinite(reliability.ceiling_r)
    assert np.mean(result.site_r[below] <= reliability.ceiling_r[below] + 0.05) > 0.9
