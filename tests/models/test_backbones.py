"""The backbone registry and the contract every registered backbone keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from itloop.models import RegistryError, build_backbone, list_backbones, register_backbone
from itloop.models.backbones import IMAGENET_MEAN, IMAGENET_STD


def test_registry_refuses_a_duplicate_name() -> None:
    with pytest.raises(RegistryError, match="'resnet50' is already registered"):

        @register_backbone("resnet50", default_layer="a", cut_points=("a",))
        def _again() -> nn.Module:
            return nn.Sequential()

    assert list_backbones().count("resnet50") == 1


def test_unknown_backbone_names_the_registered_ones() -> None:
    with pytest.raises(RegistryError, match=r"unknown backbone 'resnet51'.*'resnet50'"):
        build_backbone("resnet51")


def test_the_paper_backbone_is_registered_with_wide_variants() -> None:
    assert {"resnet50", "wide_resnet50_2", "wide_resnet50_4", "tiny"} <= set(list_backbones())


def test_resnet50_cut_at_layer4_0_gives_2048x7x7_at_224() -> None:
    backbone = build_backbone("resnet50").eval()
    assert backbone.layer == "layer4.0"
    assert backbone.out_shape((224, 224)) == (2048, 7, 7)
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 224, 224))
    assert tuple(out.shape) == (1, 2048, 7, 7)
    names = {name for name, _ in backbone.trunk.named_modules()}
    assert "layer4.0" in names
    assert "layer4.1" not in names
    assert "fc" not in names
    assert "fc.weight" in backbone.reference_shapes
    assert "layer4.2.conv3.weight" in backbone.reference_shapes


@pytest.mark.parametrize(
    ("layer", "shape"),
    [("layer1", (256, 16, 16)), ("layer3", (1024, 4, 4)), ("layer4.0", (2048, 2, 2))],
)
def test_resnet50_can_be_cut_after_any_named_layer(layer: str, shape: tuple[int, ...]) -> None:
    assert build_backbone("resnet50", layer=layer).out_shape((64, 64)) == shape


@pytest.mark.parametrize("layer", ["layer5", "layer4.3", "layer4.0.conv1", "fc"])
def test_a_cut_that_does_not_exist_names_the_layer(layer: str) -> None:
    with pytest.raises(ValueError, match=f"at '{layer}'"):
        build_backbone("resnet50", layer=layer)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n == "wide_resnet50_4" else n
        for n in list_backbones()
    ],
)
def test_every_backbone_keeps_the_contract(name: str) -> None:
    """Shape as announced, [0, 1] input normalised inside, deterministic in eval and in seed."""
    backbone = build_backbone(name, seed=3).eval()
    card = backbone.card()
    assert card.architecture == name
    assert card.mean == IMAGENET_MEAN
    assert card.std == IMAGENET_STD
    assert card.input_range == (0.0, 1.0)
    hw = (64, 64)
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone(x)
        again = backbone(x)
        manual = backbone.trunk(
            (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        )
        twin = build_backbone(name, seed=3).eval()(x)
        other = build_backbone(name, seed=4).eval()(x)
    assert tuple(out.shape) == (2, *backbone.out_shape(hw))
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    assert torch.allclose(out, manual)
    assert torch.equal(out, twin)
    assert not torch.allclose(out, other)
    assert not backbone.training
    with pytest.raises(ValueError, match=r"\(2, 1, 64, 64\)"):
        backbone(x[:, :1])


def test_out_shape_does_not_touch_batchnorm_statistics() -> None:
    backbone = build_backbone("tiny").train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert backbone.out_shape((32, 32)) == (64, 4, 4)
    assert backbone.training
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
