"""Conv + bias (+ residual) + ReLU as one op: same function, same gradients, found by fx."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from itloop.models import ITModel
from itloop.stimulus import AttackConfig, AttackEngine, AttackRows
from itloop.stimulus.folding import fold_batchnorm
from itloop.stimulus.fusion import (
    Conv1x1Matmul,
    FusedConvReLU,
    conv_bias_relu,
    count_fused,
    fuse_conv_relu,
)
from itloop.stimulus.pooling import MaxPool3x3s2, max_pool_3x3_s2, max_pool_3x3_s2_blocks

from .toys import TinyConvNet, on_grid


def _reference(x, w, b, z, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return torch.relu(y if z is None else y + z)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "residual"),
    [(1, 1, 1, 1, False), (2, 1, 1, 1, True), (1, 2, 2, 2, True), (2, 0, 1, 1, False)],
)
def test_fused_op_matches_the_composition_with_its_gradients(
    stride: int, padding: int, dilation: int, groups: int, residual: bool
) -> None:
    g = torch.Generator().manual_seed(stride * 7 + padding + dilation * 3 + groups)
    x = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    ho = (9 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (8 + 2 * padding - dilation * 2 - 1) // stride + 1
    z = (
        torch.randn(2, 6, ho, wo, generator=g, dtype=torch.float64, requires_grad=True)
        if residual
        else None
    )
    out = conv_bias_relu(x, w, b, z, *args)
    ref = _reference(x, w, b, z, *args)
    assert out.shape == ref.shape
    assert float((out - ref).detach().abs().max()) < 1e-12
    assert float((out == 0).double().mean()) > 0.1  # the ReLU is active somewhere
    inputs = (x, w, b) if z is None else (x, w, b, z)
    assert torch.autograd.gradcheck(
        lambda *t: conv_bias_relu(t[0], t[1], t[2], t[3] if residual else None, *args),
        inputs,
    )


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 3, 1), (1, 2, 2)])
def test_fake_kernel_predicts_the_real_shape_and_layout(
    channels_last: bool, stride: int, padding: int, dilation: int
) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 8, 15, 12).contiguous(memory_format=fmt)
    w = torch.randn(16, 8, 5, 5)
    b = torch.randn(16)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, 1)
    real = conv_bias_relu(x, w, b, None, *args)
    with FakeTensorMode() as mode:
        fake = conv_bias_relu(
            mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), None, *args
        )
    assert fake.shape == real.shape
    assert fake.stride() == real.stride()
    assert real.is_contiguous(memory_format=fmt)


def test_fx_rewrite_fuses_resnet_blocks_and_keeps_function_and_input_gradient() -> None:
    # float64: fp32 gradients of a ReLU network move by ~1 % with the memory layout alone.
    model = ITModel.build("resnet18", 5, input_hw=(64, 64), seed=0).eval().double()
    model.requires_grad_(False)
    x = on_grid(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))).double()
    folded = fold_batchnorm(model, x)
    fused = fuse_conv_relu(folded, x)
    n_blocks = sum(type(m).__name__ == "BasicBlock" for m in model.modules())
    # ResNet-18: the stem, then both convs of every BasicBlock (the second one with its residual).
    assert count_fused(fused) == 1 + 2 * n_blocks
    assert count_fused(folded) == 0  # the input model is left alone
    z1 = x.clone().requires_grad_(True)
    z2 = x.clone().requires_grad_(True)
    (folded(z1)[:, 2].sum()).backward()
    (fused(z2)[:, 2].sum()).backward()
    assert z1.grad is not None
    assert z2.grad is not None
    assert float((z1.grad - z2.grad).norm() / z1.grad.norm()) < 1e-10
    assert float((folded(x) - fused(x)).abs().max()) < 1e-9
    assert sum(isinstance(m, MaxPool3x3s2) for m in fused.modules()) == 1
    mm = fuse_conv_relu(folded, x, matmul_1x1=True)
    n_1x1 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in folded.modules())
    assert sum(isinstance(m, Conv1x1Matmul) for m in mm.modules()) == n_1x1 > 0
    z3 = x.clone().requires_grad_(True)
    (mm(z3)[:, 2].sum()).backward()
    assert z3.grad is not None
    assert float((z1.grad - z3.grad).norm() / z1.grad.norm()) < 1e-10


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_matmul_input_gradient_of_a_1x1_conv_equals_the_data_gradient_convolution(
    channels_last: bool, residual: bool
) -> None:
    g = torch.Generator().manual_seed(int(channels_last) * 2 + int(residual))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0 = torch.randn(3, 8, 5, 6, generator=g, dtype=torch.float64).to(memory_format=fmt)
    w = torch.randn(4, 8, 1, 1, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    z0 = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) if residual else None
    upstream = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    grads = []
    for mm in (False, True):
        x = x0.clone().requires_grad_(True)
        z = None if z0 is None else z0.clone().requires_grad_(True)
        out = conv_bias_relu(x, w, b, z, [1, 1], [0, 0], [1, 1], 1, mm)
        (out * upstream).sum().backward()
        assert x.grad is not None
        grads.append((out.detach(), x.grad, None if z is None else z.grad))
    (y0, gx0, gz0), (y1, gx1, gz1) = grads
    assert torch.equal(y0, y1)
    assert float((gx0 - gx1).abs().max()) < 1e-12 < float(gx0.abs().max())
    assert (gz0 is None) == (gz1 is None)
    if gz0 is not None and gz1 is not None:
        assert torch.equal(gz0, gz1)
    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: conv_bias_relu(t, w, b, z0, [1, 1], [0, 0], [1, 1], 1, True), (x,)
    )


def test_mm_dgrad_rewrite_of_resnet50_keeps_function_and_input_gradient() -> None:
    model = ITModel.build("resnet50", 4, layer="layer2", input_hw=(32, 32), seed=0)
    model = model.eval().double()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)).double()
    folded = fold_batchnorm(model, x)
    plain = fuse_conv_relu(folded, x)
    mm = fuse_conv_relu(folded, x, mm_dgrad=True)
    pointwise = [
        m
        for m in mm.modules()
        if isinstance(m, FusedConvReLU) and m.conv.kernel_size == (1, 1) and m.conv.stride == (1, 1)
    ]
    assert len(pointwise) >= 10  # conv1 and conv3 of each bottleneck
    assert all(m.mm_dgrad for m in pointwise)
    z1 = x.clone().requires_grad_(True)
    z2 = x.clone().requires_grad_(True)
    plain(z1)[:, 1].sum().backward()
    mm(z2)[:, 1].sum().backward()
    assert z1.grad is not None
    assert z2.grad is not None
    assert float((z1.grad - z2.grad).norm() / z1.grad.norm()) < 1e-12


class _SharedConv(nn.Module):
    """The conv's output feeds the ReLU and is also returned: fusing would lose it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(y) + y + torch.relu(self.other(y))


def test_a_conv_whose_output_is_also_used_elsewhere_is_not_fused() -> None:
    model = _SharedConv().eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fuse_conv_relu(model, x)
    assert count_fused(fused) == 1  # only `other`, whose output goes to the ReLU alone
    fused_mod = next(m for m in fused.modules() if isinstance(m, FusedConvReLU))
    assert fused_mod.conv is not model.other  # a copy: the input model is untouched
    assert float((fused(x) - model(x)).detach().abs().max()) < 1e-5


def test_engine_gives_the_same_attack_with_and_without_fusion() -> None:
    model = TinyConvNet(n_sites=3, seed=4)
    images = on_grid(torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(5)))
    rows = AttackRows.grid([0, 1, 2, 3], [0, 1, 2, 0], [0.5, 1.0])
    results = []
    for fuse in (True, False):
        cfg = AttackConfig(steps=8, batch_size=8, autocast_dtype=None, fuse_conv_relu=fuse)
        engine = AttackEngine(model, cfg)
        results.append(engine.run(images, rows, generator=torch.Generator().manual_seed(6)))
        fast = engine.prepare(images[:1])
        assert count_fused(fast) == (2 if fuse else 0)
    on, off = results
    assert float((on.f_adv_unquantised - off.f_adv_unquantised).abs().max()) < 1e-4
    assert float((on.delta_levels - off.delta_levels).abs().float().mean()) < 0.01


def test_fused_module_casts_to_the_autocast_dtype() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mod = FusedConvReLU(conv)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - torch.relu(conv(x))).detach().abs().max()) < 0.1
    with pytest.raises(ValueError, match="reflect"):
        FusedConvReLU(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))


def _with_ties(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(shape, generator=g) < 0.3, 0.0, y)  # ties, as after a ReLU


def _pool_gradients(
    pool: Callable[[Tensor], Tensor], given: Tensor, m: Tensor, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The gradients of ``pool(given)`` and of PyTorch's 3×3/2 pool of the map ``m`` (which
    ``given`` holds, in its own layout) for one output gradient; the pools' values must agree."""
    a = given.clone().requires_grad_(True)
    b = m.clone().requires_grad_(True)
    out, ref = pool(a), F.max_pool2d(b, 3, 2, 1)
    assert out.shape == ref.shape
    assert torch.equal(out.detach(), ref.detach())
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(go)
    ref.backward(go)
    assert a.grad is not None
    assert b.grad is not None
    return a.grad, b.grad


@pytest.mark.parametrize(("h", "w"), [(112, 112), (113, 110), (7, 9), (2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_matches_pytorch_in_value_and_gradient(
    h: int, w: int, channels_last: bool
) -> None:
    g = torch.Generator().manual_seed(h * 1000 + w)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = _with_ties((2, 5, h, w), g).contiguous(memory_format=fmt)
    got, want = _pool_gradients(max_pool_3x3_s2, y, y, g)
    assert torch.equal(got, want)  # ties go to the same (first) input as in PyTorch


@pytest.mark.parametrize(("hb", "wb"), [(56, 56), (5, 3), (1, 2)])
def test_max_pool_of_2x2_blocks_is_the_pool_of_the_map(hb: int, wb: int) -> None:
    """The pool of a map handed over in 2×2 blocks (channel (u·2 + v)·C + c) is PyTorch's pool of
    the map, ties included, and its gradient is the map's gradient in the same blocks."""
    g = torch.Generator().manual_seed(hb * 100 + wb)

    def blocks(m: Tensor) -> Tensor:
        return m.reshape(2, 5, hb, 2, wb, 2).permute(0, 3, 5, 1, 2, 4).reshape(2, 20, hb, wb)

    m = _with_ties((2, 5, 2 * hb, 2 * wb), g)
    given = blocks(m).contiguous(memory_format=torch.channels_last)
    got, want = _pool_gradients(max_pool_3x3_s2_blocks, given, m, g)
    assert torch.equal(got, blocks(want))
    with pytest.raises(ValueError, match=r"\(B, 4·C, Hb, Wb\), got \(2, 6, 3, 3\)"):
        max_pool_3x3_s2_blocks(torch.zeros(2, 6, 3, 3))


def test_relu_before_the_pool_moves_after_it_with_the_same_values_and_gradient() -> None:
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    stem = stem.double().eval()
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    x[0, :, :5, :5] = -3.0  # windows whose maximum is not positive
    fused = fuse_conv_relu(stem, x)
    pool = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == "3")
    assert [u.target for u in pool.users] == [torch.relu]  # the ReLU now follows the pool
    assert not any(isinstance(m, nn.ReLU) for m in fused.modules())
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = fused(a), stem(b)
    assert torch.equal(out.detach(), ref.detach())
    assert float((ref == 0).double().mean()) > 0.02  # windows with no positive value are there
    go = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(go)
    ref.backward(go)
    assert a.grad is not None
    assert b.grad is not None
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_engine_with_the_fused_resnet_stem_matches_eager() -> None:
    """The whole compiled loop (fused convs, the max pool's own backward, the fused step) gives
    the eager loop's attack."""
    model = ITModel.build("resnet18", 4, input_hw=(32, 32), seed=0)
    images = on_grid(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(8)))
    rows = AttackRows.grid([0, 1, 2, 3], [0, 1, 2, 3], [0.5])
    results = []
    for compiled in (False, True):
        cfg = AttackConfig(
            steps=4, batch_size=8, autocast_dtype=None, compile=compiled, channels_last=False
        )
        engine = AttackEngine(model, cfg)
        results.append(engine.run(images, rows, generator=torch.Generator().manual_seed(9)))
        assert sum(isinstance(m, MaxPool3x3s2) for m in engine.prepare(images).modules()) == 1
    eager, compiled_result = results
    gap = (eager.f_adv_unquantised - compiled_result.f_adv_unquantised).abs()
    assert bool((gap <= 2e-3 * eager.f_adv_unquantised.abs() + 1e-3).all())  # fp32 reordering
    gains = [float((r.sign.float() * r.predicted_change).mean()) for r in results]
    assert gains[1] > 0.98 * gains[0] > 0
    assert bool((compiled_result.realised_eps_l2 <= compiled_result.eps_l2).all())


def test_a_rewrite_that_changes_the_function_is_refused_naming_it() -> None:
    from itloop.stimulus.precision import check_same_function

    model = TinyConvNet(n_sites=3, seed=1)
    changed = TinyConvNet(n_sites=3, seed=2)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    check_same_function(model, model, x, rtol=0.0, what="nothing")
    with pytest.raises(ValueError, match=r"swapping weights changed the output: relative error"):
        check_same_function(model, changed, x, rtol=1e-4, what="swapping weights")
