"""Bottlenecks as one op: the same function and input gradient, masks moved only where exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from itloop.models import ITModel
from itloop.stimulus import AttackConfig, AttackEngine, AttackRows
from itloop.stimulus.blocks import (
    FusedBottleneck,
    bottleneck,
    conv_input_grad,
    count_blocks,
    fuse_bottlenecks,
    link_bottlenecks,
)
from itloop.stimulus.folding import fold_batchnorm
from itloop.stimulus.fusion import count_fused, fuse_conv_relu

from .toys import on_grid


def _input_grad(model: nn.Module, x: torch.Tensor, site: int = 1) -> tuple[torch.Tensor, ...]:
    z = x.clone().requires_grad_(True)
    out = model(z)
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=x.dtype)[: x.shape[0]]
    (g,) = torch.autograd.grad((out[:, site] * signs).sum(), z)
    return out.detach(), g


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@pytest.mark.parametrize(
    ("kernel", "stride", "residual", "relu_mask"),
    [(3, 1, False, True), (3, 2, True, True), (1, 1, True, False), (1, 2, False, True)],
)
def test_conv_input_grad_is_dgrad_plus_residual_masked(
    kernel: int, stride: int, residual: bool, relu_mask: bool
) -> None:
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    x = torch.randn(2, 5, 9, 9, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, kernel, kernel, generator=g, dtype=torch.float64)
    pad = kernel // 2
    y = F.conv2d(x, w, None, stride, pad)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    r = torch.randn(x.shape, generator=g, dtype=torch.float64) if residual else None
    out = conv_input_grad(dy, w, x, r, [stride] * 2, [pad] * 2, [1, 1], 1, relu_mask)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.conv2d(xr, w, None, stride, pad), xr, dy)
    if r is not None:
        ref = ref + r
    if relu_mask:
        ref = ref * (x > 0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _bottleneck(inplanes: int, planes: int, stride: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    down = None
    if stride != 1 or inplanes != planes * 4:
        down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride), nn.Identity())
    block = Bottleneck(inplanes, planes, stride, down)
    for name in ("bn1", "bn2", "bn3"):
        setattr(block, name, nn.Identity())
    for conv in (block.conv1, block.conv2, block.conv3):
        conv.bias = nn.Parameter(torch.randn(conv.out_channels) * 0.1)
    return _frozen(block.double())


@pytest.mark.parametrize(("inplanes", "planes", "stride"), [(16, 4, 1), (8, 4, 2), (16, 8, 1)])
def test_fused_bottleneck_gradient_matches_autograd(
    inplanes: int, planes: int, stride: int
) -> None:
    block = _bottleneck(inplanes, planes, stride, seed=inplanes + stride)
    fused = FusedBottleneck(block)
    x = torch.randn(3, inplanes, 10, 10, dtype=torch.float64)
    y_ref, g_ref = _input_grad(nn.Sequential(block, nn.Flatten()), x)
    y, g = _input_grad(nn.Sequential(fused, nn.Flatten()), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    xr = x[:1, :, :5, :5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fused(t), (xr,), eps=1e-6, atol=1e-7)


def test_linked_chain_gives_autograds_gradient_and_unlinked_blocks_stay_exact() -> None:
    chain = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(_bottleneck(16, 4, 1, 1), _bottleneck(16, 8, 2, 2)),
        nn.Sequential(_bottleneck(32, 8, 1, 3)),
        nn.Flatten(),
    ).double()
    _frozen(chain)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    y_ref, g_ref = _input_grad(chain, x, site=5)
    n = fuse_bottlenecks(chain)
    assert n == 3
    blocks = [m for m in chain.modules() if isinstance(m, FusedBottleneck)]
    # flattened Sequentials: each block feeds the next only; the first's input is a conv+ReLU
    assert [(b.relu_mask_input, b.grad_premasked) for b in blocks] == [
        (False, True),
        (True, True),
        (True, False),
    ]
    y, g = _input_grad(chain, x, site=5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


class _Tap(nn.Module):
    """Uses a block's output twice: the second block's masks must not be trusted to cover it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _bottleneck(16, 4, 1, 4)
        self.b = _bottleneck(16, 4, 1, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return (self.b(h) * 2 - h.tanh()).flatten(1)


def test_blocks_outside_a_sequential_are_not_linked() -> None:
    model = _frozen(_Tap())
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    _y_ref, g_ref = _input_grad(model, x, site=3)
    assert fuse_bottlenecks(model) == 2
    assert link_bottlenecks(model) == 0
    assert not any(
        m.grad_premasked or m.relu_mask_input
        for m in model.modules()
        if isinstance(m, FusedBottleneck)
    )
    _y, g = _input_grad(model, x, site=3)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_wrongly_linked_blocks_would_change_the_gradient() -> None:
    """The flags matter: forcing a link past a second consumer gives a different gradient."""
    model = _frozen(_Tap())
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    _, g_ref = _input_grad(model, x, site=3)
    fuse_bottlenecks(model)
    model.a.grad_premasked = model.b.relu_mask_input = True
    _, g = _input_grad(model, x, site=3)
    assert float((g - g_ref).norm()) > 1e-6 * float(g_ref.norm())


def test_resnet50_to_layer4_0_becomes_14_linked_blocks_with_the_same_gradient() -> None:
    model = _frozen(ITModel.build("resnet50", 5, input_hw=(48, 48), seed=0).double())
    x = torch.rand(3, 3, 48, 48, dtype=torch.float64)
    folded = fold_batchnorm(model, x)
    fused = fuse_conv_relu(folded, x, blocks=True)
    assert count_blocks(fused) == 14
    assert count_fused(fused) == 1  # the stem's conv + ReLU; every other conv is in a block
    blocks = [m for m in fused.modules() if isinstance(m, FusedBottleneck)]
    assert not blocks[0].relu_mask_input
    assert not blocks[-1].grad_premasked
    assert all(b.grad_premasked for b in blocks[:-1])
    assert all(b.relu_mask_input for b in blocks[1:])
    y_ref, g_ref = _input_grad(model, x, site=2)
    y, g = _input_grad(fused, x, site=2)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_the_engine_fuses_blocks_by_default_with_the_same_attack() -> None:
    model = ITModel.build("resnet50", 4, input_hw=(32, 32), seed=1)
    images = on_grid(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    rows = AttackRows.grid([0, 1], [0, 3], [1.0])
    results = {}
    for fuse_blocks in (True, False):
        cfg = AttackConfig(steps=3, batch_size=4, autocast_dtype=None, fuse_blocks=fuse_blocks)
        engine = AttackEngine(model, cfg)
        assert count_blocks(engine.prepare(images)) == (14 if fuse_blocks else 0)
        results[fuse_blocks] = engine.run(images, rows, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(results[True].delta_levels, results[False].delta_levels)
    torch.testing.assert_close(results[True].predicted_change, results[False].predicted_change)


def test_refusals_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="Conv2d is not a Bottleneck"):
        FusedBottleneck(nn.Conv2d(3, 3, 1))
    block = _bottleneck(16, 4, 1, 0)
    block.bn1 = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="not folded"):
        FusedBottleneck(block)
    fused = FusedBottleneck(_bottleneck(16, 4, 1, 0))
    fused.conv1.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="input gradients only"):
        fused(torch.randn(1, 16, 4, 4, dtype=torch.float64))
    out, a1, a2 = bottleneck(
        torch.randn(1, 16, 4, 4, dtype=torch.float64),
        *(
            t.detach()
            for t in (
                fused.conv1.weight,
                fused.conv1.bias,
                fused.conv2.weight,
                fused.conv2.bias,
                fused.conv3.weight,
                fused.conv3.bias,
            )
        ),
        None,
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        [1, 1],
        False,
        False,
    )
    assert out.shape == (1, 16, 4, 4)
    assert a1.shape == a2.shape == (1, 4, 4, 4)
