"""ITModel: backbone + readout, its checks, and its plain-file round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from itloop.models import CheckpointError, FactorizedReadout, ITModel, build_backbone


def test_the_constructor_the_stimulus_package_uses() -> None:
    backbone = build_backbone("tiny")
    model = ITModel(backbone=backbone, readout=FactorizedReadout(backbone.out_shape(), 4))
    assert model.n_sites == 4
    assert model.input_hw == (64, 64)
    assert model.eval()(torch.rand(3, 3, 64, 64)).shape == (3, 4)


def test_build_at_the_papers_layer_and_size() -> None:
    model = ITModel.build("resnet50", 21, layer="layer4.0", input_hw=(224, 224), seed=0)
    assert model.readout.in_shape == (2048, 7, 7)
    assert model.input_hw == (224, 224)
    card = model.card()
    assert card["backbone"]["layer"] == "layer4.0"
    assert card["readout"] == {
        "kind": "FactorizedReadout",
        "in_shape": [2048, 7, 7],
        "n_sites": 21,
        "init": "normal",
    }


def test_readout_that_does_not_fit_the_backbone_is_refused() -> None:
    backbone = build_backbone("tiny")
    with pytest.raises(ValueError, match=r"features \(64, 4, 4\) for 32×32.*expects \(64, 8, 8\)"):
        ITModel(backbone, FactorizedReadout((64, 8, 8), 2), input_hw=(32, 32))


def test_images_of_the_wrong_size_are_named() -> None:
    model = ITModel.build("tiny", 2, input_hw=(32, 32))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        model(torch.rand(1, 3, 64, 64))


def test_seed_decides_the_weights() -> None:
    a = ITModel.build("tiny", 3, input_hw=(32, 32), seed=5).state_dict()
    b = ITModel.build("tiny", 3, input_hw=(32, 32), seed=5).state_dict()
    c = ITModel.build("tiny", 3, input_hw=(32, 32), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["readout.features"], c["readout.features"])
    assert not torch.equal(a["backbone.trunk.block1.0.weight"], c["backbone.trunk.block1.0.weight"])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = ITModel.build("tiny", 5, input_hw=(32, 32), seed=1, readout_init="scaled").eval()
    saved = model.save(tmp_path / "v1", extra={"fit": {"median_val_r": 0.5}})
    card = json.loads(saved.card_path.read_text())
    assert card["weights_sha256"] == saved.weights_sha256
    assert card["extra"] == {"fit": {"median_val_r": 0.5}}
    loaded = ITModel.load(tmp_path / "v1").eval()
    assert loaded.card() == model.card()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    again = model.save(tmp_path / "v1-again")
    assert again.weights_sha256 == saved.weights_sha256


def test_a_tampered_model_file_is_refused(tmp_path: Path) -> None:
    saved = ITModel.build("tiny", 2, input_hw=(32, 32)).save(tmp_path)
    raw = bytearray(saved.weights_path.read_bytes())
    raw[-1] ^= 1
    saved.weights_path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        ITModel.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"lacks model\.json"):
        ITModel.load(tmp_path / "nowhere")
