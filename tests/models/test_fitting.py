"""Fitting: a planted readout is recovered; the fit is deterministic, masked, warm-startable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itloop.models import (
    ArrayTrialDataset,
    FactorizedReadout,
    FitConfig,
    ITModel,
    build_backbone,
    fit,
    write_trials,
)
from itloop.models.fitting import pearson_per_site, split_by_image

from .planted import PlantedData, make_planted

QUICK = FitConfig(freeze_backbone=True, max_epochs=6, patience=3, lr=3e-2, batch_size=64)


def _fresh(hw: int = 64, n_sites: int = 8, seed: int = 1) -> ITModel:
    """The tiny backbone of the planted data (seed 0) with a new scaled readout."""
    backbone = build_backbone("tiny", seed=0)
    g = torch.Generator().manual_seed(seed)
    readout = FactorizedReadout(backbone.out_shape((hw, hw)), n_sites, "scaled", generator=g)
    return ITModel(backbone, readout, input_hw=(hw, hw))


@pytest.fixture(scope="module")
def small() -> PlantedData:
    return make_planted(n_images=200, n_sites=4, repeats=2, hw=32, seed=3)


def _states_equal(a: ITModel, b: ITModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_fit_recovers_a_planted_readout() -> None:
    """Held-out r near the noise ceiling; the masks land where the planted ones are."""
    data = make_planted(n_images=1500, n_sites=8, repeats=2)
    model = _fresh()
    config = FitConfig(freeze_backbone=True, max_epochs=100, patience=10, lr=3e-2, lr_decay=0.95)
    result = fit(model, data.dataset, config)
    val = result.val_images
    ids = data.dataset.image_ids
    counts = data.dataset.responses(np.arange(data.dataset.n_trials))
    means = np.stack([counts[ids == i].mean(0) for i in val])
    ceiling = pearson_per_site(data.rates[val], means)  # the true rates against the noisy means
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.dataset.images(val))).double().numpy()
    truth_r = pearson_per_site(predicted, data.rates[val])
    fitted = model.readout.spatial.detach().flatten(1).numpy()
    planted = data.planted.spatial.detach().flatten(1).numpy()
    mask_r = [abs(np.corrcoef(fitted[n], planted[n])[0, 1]) for n in range(8)]
    print(
        f"held-out r {np.median(result.site_r):.3f} vs ceiling {np.median(ceiling):.3f}; "
        f"r with true rates {np.median(truth_r):.3f}; mask r {np.median(mask_r):.3f}"
    )
    np.testing.assert_allclose(result.site_r, result.metrics["val_r"])
    assert np.median(result.site_r) >= 0.85 * np.median(ceiling)
    assert np.all(result.site_r <= ceiling + 0.05)
    assert np.median(truth_r) > 0.85
    assert np.median(mask_r) > 0.75
    assert result.metrics["feature_cache"] is True
    assert result.metrics["n_train"] + result.metrics["n_val"] == data.dataset.n_trials


def test_the_same_seed_gives_the_same_fit(small: PlantedData) -> None:
    a = fit(_fresh(32, 4), small.dataset, QUICK)
    b = fit(_fresh(32, 4), small.dataset, QUICK)
    assert _states_equal(a.model, b.model)
    assert a.metrics == b.metrics
    assert a.history == b.history
    other = fit(_fresh(32, 4), small.dataset, FitConfig(**{**QUICK.__dict__, "seed": 1}))
    assert not np.array_equal(other.val_images, a.val_images)
    assert other.metrics["data_sha256"] != a.metrics["data_sha256"]


def test_held_out_split_is_by_image() -> None:
    image_ids = np.repeat(np.arange(50), 4)
    train, val = split_by_image(image_ids, 0.2, seed=0)
    assert set(image_ids[train]).isdisjoint(image_ids[val])
    assert len(set(image_ids[val])) == 10
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(200))
    with pytest.raises(ValueError, match="at least 2 distinct images, got 1"):
        split_by_image(np.zeros(5, np.int64), 0.2, seed=0)


def test_fingerprint_covers_training_trials_only(small: PlantedData) -> None:
    base = fit(_fresh(32, 4), small.dataset, FitConfig(**{**QUICK.__dict__, "max_epochs": 0}))
    ds = small.dataset
    responses = ds.responses(np.arange(ds.n_trials))
    train, val = split_by_image(ds.image_ids, QUICK.val_fraction, QUICK.seed)
    for trial, changes in ((val[0], False), (train[0], True)):
        edited = responses.copy()
        edited[trial, 0] += 1
        other = ArrayTrialDataset(ds._images, ds.image_ids, edited)
        result = fit(_fresh(32, 4), other, FitConfig(**{**QUICK.__dict__, "max_epochs": 0}))
        assert (result.metrics["data_sha256"] != base.metrics["data_sha256"]) is changes


def test_missing_entries_do_not_count(small: PlantedData) -> None:
    """Garbage under an explicit mask fits exactly like NaN; a site never recorded gets r NaN."""
    ds = small.dataset
    responses = ds.responses(np.arange(ds.n_trials))
    hidden = np.zeros_like(responses, dtype=bool)
    hidden[::2, 1] = True
    hidden[:, 3] = True
    garbage = np.where(hidden, 1e6, responses).astype(np.float32)
    masked = ArrayTrialDataset(ds._images, ds.image_ids, garbage, observed=~hidden)
    nan = ArrayTrialDataset(ds._images, ds.image_ids, np.where(hidden, np.nan, responses))
    a = fit(_fresh(32, 4), masked, QUICK)
    b = fit(_fresh(32, 4), nan, QUICK)
    assert _states_equal(a.model, b.model)
    assert a.metrics["val_r"][3] is None
    assert np.isnan(a.site_r[3])
    assert a.metrics["n_train_observed"][3] == 0
    assert all(np.isfinite(a.site_r[:3]))
    assert np.all(np.abs(a.model.readout.bias.detach().numpy()) < 1e3)


def test_warm_start_begins_at_the_given_weights(small: PlantedData, tmp_path: Path) -> None:
    previous = fit(_fresh(32, 4), small.dataset, QUICK).model
    previous.save(tmp_path / "v1")
    for source in (previous, tmp_path / "v1", previous.state_dict()):
        start = fit(
            _fresh(32, 4, seed=9),
            small.dataset,
            FitConfig(**{**QUICK.__dict__, "max_epochs": 0}),
            init_from=source,
        )
        assert _states_equal(start.model, previous)
    warm = fit(_fresh(32, 4, seed=9), small.dataset, QUICK, init_from=previous)
    cold = fit(_fresh(32, 4, seed=9), small.dataset, QUICK)
    assert warm.history[0].val_loss == pytest.approx(
        fit(previous, small.dataset, FitConfig(**{**QUICK.__dict__, "max_epochs": 0}))
        .history[0]
        .val_loss
    )
    assert warm.history[0].val_loss < cold.history[0].val_loss
    assert warm.metrics["warm_start"] == "ITModel"
    with pytest.raises(ValueError, match="cannot warm-start"):
        fit(_fresh(32, 4), small.dataset, QUICK, init_from={"readout.bias": torch.zeros(4)})


def test_the_returned_model_is_the_best_epoch(small: PlantedData) -> None:
    config = FitConfig(freeze_backbone=True, max_epochs=8, patience=2, lr=0.3, lr_decay=0.5)
    result = fit(_fresh(32, 4), small.dataset, config)
    assert result.metrics["epochs"] == len(result.history) - 1 <= 8
    losses = [h.val_loss for h in result.history]
    assert result.metrics["best_val_loss"] == min(losses)
    assert result.metrics["best_epoch"] == int(np.argmin(losses))
    lrs = [h.lr for h in result.history[1:]]
    np.testing.assert_allclose(np.diff(np.log(lrs)), np.log(0.5))
    check = fit(result.model, small.dataset, FitConfig(max_epochs=0, freeze_backbone=True))
    assert check.history[0].val_loss == pytest.approx(result.metrics["best_val_loss"], rel=1e-5)


def test_frozen_backbone_stays_put_and_end_to_end_moves_it(
    small: PlantedData, tmp_path: Path
) -> None:
    ds = small.dataset
    on_disk = write_trials(
        tmp_path / "trials", ds._images, ds.image_ids, ds.responses(np.arange(ds.n_trials))
    )
    frozen = _fresh(32, 4)
    before = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    fit(frozen, on_disk, QUICK)
    assert all(torch.equal(v, before[k]) for k, v in frozen.backbone.state_dict().items())
    assert all(p.requires_grad for p in frozen.parameters())
    joint = _fresh(32, 4)
    config = FitConfig(max_epochs=2, patience=2, lr=3e-2, backbone_lr=1e-3, batch_size=32)
    result = fit(joint, on_disk, config)
    assert result.metrics["feature_cache"] is False
    moved = joint.backbone.state_dict()
    assert not torch.equal(moved["trunk.block1.0.weight"], before["trunk.block1.0.weight"])
    assert torch.equal(moved["trunk.block1.1.running_mean"], before["trunk.block1.1.running_mean"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("val_fraction", 1.0),
        ("batch_size", 0),
        ("lr", float("nan")),
        ("lr_decay", 0.0),
        ("patience", -1),
    ],
)
def test_bad_settings_are_named(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field} must"):
        FitConfig(**{field: value})  # type: ignore[arg-type]


def test_dataset_and_model_must_agree(small: PlantedData) -> None:
    with pytest.raises(ValueError, match="dataset has 4 sites, the model 3"):
        fit(_fresh(32, 3), small.dataset, QUICK)
    with pytest.raises(
        ValueError, match=r"dataset images are \(32, 32\), the model takes \(64, 64\)"
    ):
        fit(_fresh(64, 4), small.dataset, QUICK)
