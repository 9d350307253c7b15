"""Fitting an ITModel end to end on (image, per-site spike count) trials.

The loss is the mean squared error over observed (trial, site) entries, each site's error divided
by its training-set s.d. so that high-rate sites do not dominate; missing entries (NaN or
``observed`` False) contribute nothing. The held-out split is by image, never by trial, so the
repeats of one image are all on one side. Adam, one learning rate for the readout and a lower
one for the backbone, both decayed by ``lr_decay`` each epoch; early stopping on the held-out
loss, and the best epoch's weights are the ones returned.

The whole model stays in eval mode while fitting: BatchNorm uses (and keeps) its running
statistics, so a warm-started nightly refit cannot drift the backbone's normalisation on small
batches; its affine parameters are fitted like any other weight.

Deterministic under ``FitConfig.seed`` (split, batch order, nothing else is random) on the CPU;
on a GPU up to the nondeterminism of its kernels.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from itloop.models.it_model import ITModel
from itloop.models.trials import TrialDataset

__all__ = ["EpochRecord", "FitConfig", "FitResult", "fit", "pearson_per_site", "split_by_image"]


@dataclass(frozen=True)
class FitConfig:
    """Settings of one fit. Learning rates are Adam step sizes; lr_decay multiplies them per epoch.

    patience: epochs without a held-out loss improvement of at least ``min_improvement``
    (relative) before stopping. l1: weight of the readout's regularizer. feature_cache_bytes:
    with a frozen backbone, features of all images are computed once if they fit in this budget.
    """

    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 64
    eval_batch_size: int = 256
    max_epochs: int = 30
    patience: int = 5
    min_improvement: float = 1e-4
    lr: float = 1e-2
    backbone_lr: float = 1e-4
    lr_decay: float = 0.95
    freeze_backbone: bool = False
    l1: float = 0.0
    centre_bias: bool = True
    feature_cache_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_epochs", "patience", "feature_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("lr", "backbone_lr", "l1", "min_improvement"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean normalised squared error on train and held-out trials, readout lr."""

    epoch: int
    train_loss: float
    val_loss: float
    lr: float


@dataclass
class FitResult:
    """The fitted model (the same object passed in, at its best epoch) and what the fit saw.

    site_r: (N,) Pearson r per site between predictions and held-out per-image mean responses
    (NaN for a site with fewer than 3 held-out images or no variance). metrics: JSON-ready.
    """

    model: ITModel
    site_r: NDArray[np.float64]
    metrics: dict[str, Any]
    history: list[EpochRecord] = field(default_factory=list)
    train_images: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    val_images: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))


def split_by_image(
    image_ids: NDArray[np.int64], val_fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(T,) image id per trial -> (train trial indices, held-out trial indices), split by image."""
    unique = np.unique(image_ids)
    if unique.size < 2:
        raise ValueError(f"a held-out split needs at least 2 distinct images, got {unique.size}")
    n_val = min(max(1, round(val_fraction * unique.size)), unique.size - 1)
    rng = np.random.default_rng(seed)
    val_images = np.sort(rng.permutation(unique)[:n_val])
    is_val = np.isin(image_ids, val_images)
    trials = np.arange(image_ids.shape[0], dtype=np.int64)
    return trials[~is_val], trials[is_val]


def pearson_per_site(
    predicted: NDArray[np.floating[Any]], observed: NDArray[np.floating[Any]]
) -> NDArray[np.float64]:
    """(M, N) predictions and (M, N) observations (NaN = missing) -> (N,) Pearson r per site.

    NaN for a site with fewer than 3 observed rows or zero variance in either.
    """
    if predicted.shape != observed.shape or predicted.ndim != 2:
        raise ValueError(f"expected two (M, N) arrays, got {predicted.shape} and {observed.shape}")
    out = np.full(predicted.shape[1], np.nan)
    for n in range(predicted.shape[1]):
        keep = np.isfinite(observed[:, n])
        if keep.sum() < 3:
            continue
        p = predicted[keep, n].astype(np.float64)
        o = observed[keep, n].astype(np.float64)
        p, o = p - p.mean(), o - o.mean()
        denom = math.sqrt(float(p @ p) * float(o @ o))
        if denom > 0:
            out[n] = float(p @ o) / denom
    return out


def _chunks(indices: NDArray[np.int64], size: int) -> Iterator[NDArray[np.int64]]:
    for start in range(0, indices.shape[0], size):
        yield indices[start : start + size]


def _canonical(responses: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.where(np.isnan(responses), np.float32(np.nan), responses).astype(np.float32)


def _train_statistics(
    dataset: TrialDataset, trials: NDArray[np.int64], chunk: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], str]:
    """Per-site mean, s.d. and count of observed training entries, and the data's sha256.

    The fingerprint covers the training images' bytes (sorted by id) and every training trial's
    image id and responses, in trial order.
    """
    n = dataset.n_sites
    total = np.zeros(n)
    total_sq = np.zeros(n)
    count = np.zeros(n, dtype=np.int64)
    digest = hashlib.sha256(b"itloop.trials/1")
    image_ids = dataset.image_ids
    for ids in _chunks(np.unique(image_ids[trials]), max(1, chunk // 4)):
        digest.update(ids.astype("<i8").tobytes())
        digest.update(dataset.image_bytes(ids))
    for batch in _chunks(trials, chunk):
        y = _canonical(dataset.responses(batch))
        digest.update(image_ids[batch].astype("<i8").tobytes())
        digest.update(y.astype("<f4").tobytes())
        seen = ~np.isnan(y)
        y0 = np.where(seen, y, 0.0).astype(np.float64)
        total += y0.sum(0)
        total_sq += (y0**2).sum(0)
        count += seen.sum(0)
    safe = np.maximum(count, 1)
    mean = total / safe
    var = np.maximum(total_sq / safe - mean**2, 0.0)
    sd = np.sqrt(var)
    sd = np.where((count >= 2) & (sd > 1e-8), sd, 1.0)
    return mean, sd, count, digest.hexdigest()


class _Predictor:
    """Predictions for trials' images: from cached features when the backbone is frozen."""

    def __init__(
        self,
        model: ITModel,
        dataset: TrialDataset,
        device: torch.device,
        cache_ids: NDArray[np.int64] | None,
        eval_batch: int,
    ) -> None:
        self.model = model
        self.dataset = dataset
        self.device = device
        self.cache_ids = cache_ids
        self.cache: Tensor | None = None
        if cache_ids is not None:
            parts = []
            with torch.no_grad():
                for ids in _chunks(cache_ids, eval_batch):
                    parts.append(self.model.backbone(self._images(ids)))
            self.cache = torch.cat(parts)

    def _images(self, ids: NDArray[np.int64]) -> Tensor:
        return torch.from_numpy(self.dataset.images(ids)).to(self.device)

    def __call__(self, ids: NDArray[np.int64]) -> Tensor:
        """(K,) image ids -> (K, N) predictions (each distinct image forwarded once)."""
        unique, inverse = np.unique(ids, return_inverse=True)
        if self.cache is not None and self.cache_ids is not None:
            rows = torch.from_numpy(np.searchsorted(self.cache_ids, unique)).to(self.device)
            pred: Tensor = self.model.readout(self.cache[rows])
        else:
            pred = self.model(self._images(unique))
        return pred[torch.from_numpy(inverse.reshape(-1)).to(self.device)]


def _loss_terms(pred: Tensor, y: NDArray[np.float32], sd: Tensor) -> tuple[Tensor, int]:
    """Sum of squared normalised errors over observed entries, and how many entries there were."""
    target = torch.from_numpy(y).to(pred.device)
    seen = ~torch.isnan(target)
    err = torch.where(seen, (pred - torch.nan_to_num(target)) / sd, torch.zeros_like(pred))
    return (err**2).sum(), int(seen.sum())


def _evaluate(
    predict: _Predictor,
    dataset: TrialDataset,
    trials: NDArray[np.int64],
    sd: Tensor,
    batch: int,
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """Held-out loss, and per-image predictions and mean observed responses (M_val, N)."""
    image_ids = dataset.image_ids
    images = np.unique(image_ids[trials])
    with torch.no_grad():
        pred = torch.cat([predict(ids) for ids in _chunks(images, batch)])
    rows = np.searchsorted(images, image_ids[trials])
    total, count = 0.0, 0
    sums = np.zeros((images.size, dataset.n_sites))
    counts = np.zeros((images.size, dataset.n_sites))
    for start in range(0, trials.size, batch):
        part = trials[start : start + batch]
        y = dataset.responses(part)
        r = rows[start : start + batch]
        s, c = _loss_terms(pred[torch.from_numpy(r).to(pred.device)], y, sd)
        total += float(s)
        count += c
        seen = ~np.isnan(y)
        np.add.at(sums, r, np.where(seen, y, 0.0))
        np.add.at(counts, r, seen)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(counts > 0, sums / counts, np.nan)
    return total / max(count, 1), pred.double().cpu().numpy(), observed


def _load_warm_start(model: ITModel, init_from: ITModel | str | Path | Mapping[str, Tensor]) -> str:
    """Copy ``init_from``'s weights into ``model``; returns a description for the metrics."""
    if isinstance(init_from, ITModel):
        state: Mapping[str, Tensor] = init_from.state_dict()
        what = "ITModel"
    elif isinstance(init_from, str | Path):
        state = ITModel.load(init_from).state_dict()
        what = str(init_from)
    else:
        state = init_from
        what = "state dict"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"cannot warm-start from {what}: {exc}") from exc
    return what


def fit(
    model: ITModel,
    dataset: TrialDataset,
    config: FitConfig | None = None,
    *,
    init_from: ITModel | str | Path | Mapping[str, Tensor] | None = None,
) -> FitResult:
    """Fit ``model`` in place on ``dataset`` and return it at its best held-out epoch.

    init_from: a previous model version (an ITModel, a directory saved by ITModel.save, or a
    state dict) whose weights the fit starts from; otherwise the model's own weights, with the
    readout's bias centred on the training means if ``config.centre_bias``.
    """
    cfg = config or FitConfig()
    if dataset.n_sites != model.n_sites:
        raise ValueError(f"dataset has {dataset.n_sites} sites, the model {model.n_sites}")
    if dataset.image_hw != model.input_hw:
        raise ValueError(f"dataset images are {dataset.image_hw}, the model takes {model.input_hw}")
    device = next(model.parameters()).device
    train, val = split_by_image(dataset.image_ids, cfg.val_fraction, cfg.seed)
    mean_np, sd_np, count, data_sha = _train_statistics(dataset, train, cfg.eval_batch_size * 4)
    if int(count.sum()) == 0:
        raise ValueError("every training response is missing: nothing to fit")
    mean = torch.tensor(mean_np, dtype=torch.float32, device=device)
    sd = torch.tensor(sd_np, dtype=torch.float32, device=device)
    warm = None if init_from is None else _load_warm_start(model, init_from)

    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    try:
        if cfg.freeze_backbone:
            model.backbone.requires_grad_(False)
        used = np.unique(dataset.image_ids)
        c, h, w = model.readout.in_shape
        cache = cfg.freeze_backbone and used.size * c * h * w * 4 <= cfg.feature_cache_bytes
        predict = _Predictor(model, dataset, device, used if cache else None, cfg.eval_batch_size)
        rng = np.random.default_rng(cfg.seed)
        if warm is None and cfg.centre_bias:
            train_images = np.unique(dataset.image_ids[train])
            sample = np.sort(rng.permutation(train_images)[: 4 * cfg.eval_batch_size])
            with torch.no_grad():
                pred = torch.cat([predict(ids) for ids in _chunks(sample, cfg.eval_batch_size)])
                model.readout.bias.add_(mean - pred.mean(0))

        groups = [{"params": list(model.readout.parameters()), "lr": cfg.lr}]
        backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
        if backbone_params and not cfg.freeze_backbone:
            groups.append({"params": backbone_params, "lr": cfg.backbone_lr})
        optimiser = torch.optim.Adam(groups)

        val_loss, _, _ = _evaluate(predict, dataset, val, sd, cfg.eval_batch_size)
        history = [EpochRecord(0, math.nan, val_loss, cfg.lr)]
        best_loss, best_epoch = val_loss, 0
        best_state = _snapshot(model, cfg.freeze_backbone)
        stale = 0
        for epoch in range(1, cfg.max_epochs + 1):
            total, entries = 0.0, 0
            for batch in _chunks(rng.permutation(train), cfg.batch_size):
                y = dataset.responses(batch)
                pred = predict(dataset.image_ids[batch])
                sq, n_seen = _loss_terms(pred, y, sd)
                if n_seen == 0:
                    continue
                loss = sq / n_seen
                if cfg.l1 > 0:
                    loss = loss + cfg.l1 * model.readout.regularizer()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                total += float(sq.detach())
                entries += n_seen
            val_loss, _, _ = _evaluate(predict, dataset, val, sd, cfg.eval_batch_size)
            lr_now = float(optimiser.param_groups[0]["lr"])
            history.append(EpochRecord(epoch, total / max(entries, 1), val_loss, lr_now))
            if not math.isfinite(val_loss):
                break
            if val_loss < best_loss * (1 - cfg.min_improvement):
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = _snapshot(model, cfg.freeze_backbone)
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
            for group in optimiser.param_groups:
                group["lr"] *= cfg.lr_decay
        model.load_state_dict(best_state, strict=False)
        _, val_pred, val_obs = _evaluate(predict, dataset, val, sd, cfg.eval_batch_size)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])
        model.train(was_training)

    site_r = pearson_per_site(val_pred, val_obs)
    finite = site_r[np.isfinite(site_r)]
    metrics: dict[str, Any] = {
        "val_r": [None if not math.isfinite(v) else float(v) for v in site_r],
        "median_val_r": float(np.median(finite)) if finite.size else None,
        "n_train": int(train.size),
        "n_val": int(val.size),
        "n_train_images": int(np.unique(dataset.image_ids[train]).size),
        "n_val_images": int(np.unique(dataset.image_ids[val]).size),
        "n_train_observed": [int(v) for v in count],
        "epochs": len(history) - 1,
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "data_sha256": data_sha,
        "warm_start": warm,
        "feature_cache": bool(cache),
        "config": asdict(cfg),
    }
    return FitResult(
        model=model,
        site_r=site_r,
        metrics=metrics,
        history=history,
        train_images=np.unique(dataset.image_ids[train]),
        val_images=np.unique(dataset.image_ids[val]),
    )


def _snapshot(model: ITModel, readout_only: bool) -> dict[str, Tensor]:
    """A detached copy of the weights that can change (the readout's only, if frozen)."""
    state = model.readout.state_dict(prefix="readout.") if readout_only else model.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}
