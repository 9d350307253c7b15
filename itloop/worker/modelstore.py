"""Model versions on disk: a model's weights as a content-addressed artifact, and back.

A version's row holds what rebuilds the architecture (``config["card"]``, the model card) and
the sha256 of its weights (safetensors); the weights live in the artifact store, the site
order in ``model_version_sites``.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop import __version__
from itloop.models import ITModel
from itloop.server.artifacts import ContentStore
from itloop.server.db.tables import (
    ElectrodeArray,
    ModelVersion,
    ModelVersionSite,
    RecordingSite,
)
from itloop.server.settings import Settings

__all__ = [
    "create_day0_version",
    "load_model",
    "load_model_files",
    "record_version",
    "save_weights",
    "site_order",
    "subject_sites",
]

_cache: dict[tuple[str, str], ITModel] = {}


def save_weights(store: ContentStore, model: torch.nn.Module) -> str:
    """Store the model's state dict as safetensors; returns its sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return store.put(safetensors_save(state))


def site_order(db: Session, version: ModelVersion) -> list[int]:
    """The recording site id predicted by each readout output of ``version``."""
    rows = db.execute(
        select(ModelVersionSite.site_id, ModelVersionSite.readout_index)
        .where(ModelVersionSite.model_version_id == version.id)
        .order_by(ModelVersionSite.readout_index)
    ).all()
    if [index for _, index in rows] != list(range(len(rows))):
        raise ValueError(f"model version {version.id} has a gap in its readout indices")
    return [site for site, _ in rows]


def load_model(store: ContentStore, version: ModelVersion, device: torch.device) -> ITModel:
    """The model of ``version`` on ``device``, in eval mode (the last one is cached)."""
    return load_model_files(store, version.checkpoint_sha256, version.config["card"], device)


def load_model_files(
    store: ContentStore, checkpoint_sha256: str, card: dict[str, Any], device: torch.device
) -> ITModel:
    """The model of a card and its stored weights on ``device``, in eval mode (the last one is
    cached): :func:`load_model` without the database row."""
    key = (checkpoint_sha256, str(device))
    cached = _cache.get(key)
    if cached is not None:
        return cached
    model = ITModel.from_card(card)
    model.load_state_dict(safetensors_load(store.get(checkpoint_sha256)), strict=True)
    model = model.to(device).eval()
    _cache.clear()
    _cache[key] = model
    return model


def record_version(
    db: Session,
    store: ContentStore,
    model: ITModel,
    *,
    subject_id: int,
    parent: ModelVersion | None,
    sites: list[int],
    fingerprint: str,
    n_trials: int,
    metrics: dict[str, Any],
    site_r: list[float | None] | None = None,
) -> ModelVersion:
    """A new immutable version row for ``model`` (weights stored, sites mapped; not committed)."""
    card = model.card()
    version = ModelVersion(
        subject_id=subject_id,
        parent_id=parent.id if parent else None,
        backbone=str(card["backbone"].get("architecture", "")),
        layer=str(card["backbone"].get("layer", "")),
        config={"card": card, "input_px": int(model.input_hw[0])},
        checkpoint_sha256=save_weights(store, model),
        training_data_fingerprint=fingerprint,
        n_trials=n_trials,
        metrics=metrics,
        code_version=__version__,
    )
    db.add(version)
    db.flush()
    db.add_all(
        ModelVersionSite(
            model_version_id=version.id,
            site_id=site,
            readout_index=i,
            heldout_r=None if site_r is None else site_r[i],
        )
        for i, site in enumerate(sites)
    )
    return version


def subject_sites(db: Session, subject_id: int) -> list[int]:
    return list(
        db.scalars(
            select(RecordingSite.id)
            .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
            .where(ElectrodeArray.subject_id == subject_id)
            .order_by(RecordingSite.id)
        )
    )


def create_day0_version(
    db: Session, store: ContentStore, settings: Settings, subject_id: int, *, seed: int
) -> ModelVersion:
    """The subject's first model: the configured backbone and the paper's N(0, 1) readout.

    Its readout predicts every recording site of the subject (ascending id); sessions record
    subsets of them.
    """
    sites = subject_sites(db, subject_id)
    if not sites:
        raise ValueError(f"subject {subject_id} has no recording sites to model")
    px = settings.model_input_px
    model = ITModel.build(
        settings.model_backbone,
        len(sites),
        layer=settings.model_layer,
        input_hw=(px, px),
        seed=seed,
        readout_init="normal",
        pretrained_path=settings.model_checkpoint,
        trusted=settings.model_checkpoint_trusted,
    )
    return record_version(
        db,
        store,
        model,
        subject_id=subject_id,
        parent=None,
        sites=sites,
        fingerprint="0" * 64,
        n_trials=0,
        metrics={"day0": True, "seed": seed},
    )
