"""The model of IT: a backbone cut after a layer and a readout onto N recorded sites.

Saved as two plain files, ``model.safetensors`` (the state dict, no pickle) and ``model.json``
(the card: backbone card, readout card, input size, the weights file's sha256), so a model
version is content-addressable and loads without running code from the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from itloop.models.backbones import Backbone, BackboneCard, build_backbone
from itloop.models.checkpoints import read_saved, sha256_file
from itloop.models.errors import CheckpointError
from itloop.models.readouts import FactorizedReadout, Readout, ReadoutInit

__all__ = ["CARD_FORMAT", "ITModel", "SavedModel"]

CARD_FORMAT = "itloop.ITModel/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
_READOUTS: dict[str, type[Readout]] = {"FactorizedReadout": FactorizedReadout}


@dataclass(frozen=True)
class SavedModel:
    """Where a model was written and the sha256 of both files."""

    weights_path: Path
    card_path: Path
    weights_sha256: str
    card_sha256: str


class ITModel(nn.Module):
    """Backbone + readout: (B, 3, H, W) RGB in [0, 1] -> (B, N) predicted site responses.

    input_hw: the image size (H, W) in pixels the model takes (default: the backbone's); the
    readout's in_shape must equal ``backbone.out_shape(input_hw)``.
    """

    def __init__(
        self, backbone: Backbone, readout: Readout, *, input_hw: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        hw = backbone.input_hw if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
        feats = backbone.out_shape(hw)
        if feats != readout.in_shape:
            raise ValueError(
                f"backbone {backbone.name!r} at {backbone.layer!r} gives features {feats} for "
                f"{hw[0]}×{hw[1]} inputs, but the readout expects {readout.in_shape}; "
                "pass the matching input_hw"
            )
        self.backbone = backbone
        self.readout = readout
        self.input_hw = hw

    @property
    def n_sites(self) -> int:
        return self.readout.n_sites

    @classmethod
    def build(
        cls,
        backbone_name: str,
        n_sites: int,
        *,
        layer: str | None = None,
        input_hw: tuple[int, int] = (224, 224),
        seed: int = 0,
        readout_init: ReadoutInit = "normal",
        pretrained_path: str | Path | None = None,
        trusted: bool = False,
    ) -> ITModel:
        """A registered backbone cut at ``layer`` and a FactorizedReadout, both drawn from ``seed``.

        The readout defaults to the paper's day-0 N(0, 1) init; ``pretrained_path``/``trusted``
        go to :func:`build_backbone`.
        """
        backbone = build_backbone(
            backbone_name, layer=layer, pretrained_path=pretrained_path, trusted=trusted, seed=seed
        )
        generator = torch.Generator().manual_seed(seed + 1)
        readout = FactorizedReadout(
            backbone.out_shape(input_hw), n_sites, readout_init, generator=generator
        )
        return cls(backbone, readout, input_hw=input_hw)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1], H×W = input_hw -> (B, N) site responses."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.input_hw:
            raise ValueError(
                f"expected images (B, 3, {self.input_hw[0]}, {self.input_hw[1]}), "
                f"got {tuple(images.shape)}"
            )
        return cast(Tensor, self.readout(self.backbone(images)))

    def card(self) -> dict[str, Any]:
        """JSON-ready description: backbone card, readout card, input size, feature shape."""
        return {
            "format": CARD_FORMAT,
            "backbone": self.backbone.card().to_dict(),
            "readout": self.readout.card(),
            "input_hw": list(self.input_hw),
            "n_sites": self.n_sites,
        }

    def save(self, directory: str | Path, *, extra: Mapping[str, Any] | None = None) -> SavedModel:
        """Write model.safetensors and model.json into ``directory``; ``extra`` goes in the card."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / WEIGHTS_FILE
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(weights))
        card = self.card()
        card["weights_sha256"] = sha256_file(weights)
        if extra:
            card["extra"] = dict(extra)
        card_path = folder / CARD_FILE
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n")
        return SavedModel(weights, card_path, card["weights_sha256"], sha256_file(card_path))

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> ITModel:
        """The model saved by :meth:`save`; CheckpointError if the weights' sha256 differs."""
        folder = Path(directory)
        card, weights = read_saved(folder, CARD_FILE, WEIGHTS_FILE, what="saved model")
        if card.get("format") != CARD_FORMAT:
            raise CheckpointError(
                f"{folder / CARD_FILE} has format {card.get('format')!r}, not {CARD_FORMAT}"
            )
        model = cls.from_card(card)
        model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
        return model.to(device)

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> ITModel:
        """An ITModel of the architecture a card describes, with freshly initialised weights."""
        bcard = BackboneCard.from_dict(card["backbone"])
        backbone = build_backbone(
            bcard.architecture, layer=bcard.layer, seed=bcard.seed if bcard.seed is not None else 0
        )
        backbone.with_source(bcard.source)
        rcard = card["readout"]
        kind = _READOUTS.get(str(rcard["kind"]))
        if kind is None:
            raise CheckpointError(
                f"unknown readout kind {rcard['kind']!r}; known: {list(_READOUTS)}"
            )
        c, h, w = (int(s) for s in rcard["in_shape"])
        readout = (
            FactorizedReadout((c, h, w), int(rcard["n_sites"]), rcard.get("init", "normal"))
            if kind is FactorizedReadout
            else kind((c, h, w), int(rcard["n_sites"]))
        )
        return cls(backbone, readout, input_hw=(int(card["input_hw"][0]), int(card["input_hw"][1])))
