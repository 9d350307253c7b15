"""The factorized readout: the formula, its shape checks and its initialisations."""

from __future__ import annotations

import pytest
import torch

from itloop.models import FactorizedReadout


def test_forward_is_the_factorized_sum() -> None:
    g = torch.Generator().manual_seed(0)
    readout = FactorizedReadout((6, 3, 4), 5, generator=g)
    with torch.no_grad():
        readout.bias.copy_(torch.arange(5.0))
    feats = torch.randn(7, 6, 3, 4, generator=g)
    expected = torch.einsum("bchw,nhw,nc->bn", feats, readout.spatial, readout.features)
    out = readout(feats)
    assert out.shape == (7, 5)
    torch.testing.assert_close(out, expected + readout.bias, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        out,
        torch.einsum("bchw,nchw->bn", feats, readout.weights()) + readout.bias,
        rtol=1e-5,
        atol=1e-4,
    )


def test_channels_last_features_give_the_same_answer() -> None:
    readout = FactorizedReadout((8, 7, 7), 3, "scaled", generator=torch.Generator().manual_seed(1))
    feats = torch.randn(4, 8, 7, 7)
    torch.testing.assert_close(readout(feats.to(memory_format=torch.channels_last)), readout(feats))


@pytest.mark.parametrize("bad", [(2, 6, 3, 5), (2, 6, 4, 3), (6, 3, 4)])
def test_wrong_feature_shapes_are_named(bad: tuple[int, ...]) -> None:
    readout = FactorizedReadout((6, 3, 4), 2)
    with pytest.raises(ValueError, match="expected features") as info:
        readout(torch.zeros(bad))
    assert str(info.value) == f"expected features (B, *(6, 3, 4)), got {bad}"


@pytest.mark.parametrize(
    ("in_shape", "n_sites", "init", "match"),
    [
        ((6, 3), 2, "normal", "in_shape"),
        ((6, 0, 3), 2, "normal", "in_shape"),
        ((6, 3, 3), 0, "normal", "n_sites"),
        ((6, 3, 3), 2, "xavier", "'xavier'"),
    ],
)
def test_bad_construction_is_named(
    in_shape: tuple[int, ...], n_sites: int, init: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FactorizedReadout(in_shape, n_sites, init)  # type: ignore[arg-type]


def test_the_papers_normal_init_and_the_scaled_one() -> None:
    normal = FactorizedReadout((2048, 7, 7), 200, generator=torch.Generator().manual_seed(0))
    assert abs(normal.features.std().item() - 1) < 0.01
    assert abs(normal.spatial.std().item() - 1) < 0.02
    assert abs(normal.features.mean().item()) < 0.01
    assert torch.equal(normal.bias, torch.zeros(200))
    scaled = FactorizedReadout(
        (2048, 7, 7), 200, "scaled", generator=torch.Generator().manual_seed(0)
    )
    assert abs(scaled.features.std().item() * 2048**0.5 - 1) < 0.01
    assert abs(scaled.spatial.std().item() * 7 - 1) < 0.02
    feats = torch.randn(64, 2048, 7, 7)
    assert 0.5 < scaled(feats).std().item() < 2.0
    again = FactorizedReadout((2048, 7, 7), 200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.features, normal.features)


def test_regularizer_is_the_l1_norm_of_the_full_weights() -> None:
    readout = FactorizedReadout((4, 2, 2), 3, generator=torch.Generator().manual_seed(2))
    expected = readout.weights().abs().flatten(1).sum(1).mean()
    torch.testing.assert_close(readout.regularizer(), expected)
    with torch.no_grad():
        readout.spatial.mul_(10)
        readout.features.div_(10)
    torch.testing.assert_close(readout.regularizer(), expected)
