"""The per-site PGD engine: known optima, both signs, seeds, fp32 first layer, loud budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itloop.stimulus import (
    AttackConfig,
    AttackEngine,
    AttackError,
    AttackResult,
    AttackRows,
    Fp32Input,
    SplitStem,
    fold_batchnorm,
    from_levels,
    select_largest_change,
    to_levels,
)
from itloop.stimulus import attacks as attacks_module
from itloop.stimulus.fusion import FusedConvReLU
from itloop.stimulus.precision import perturbation_conv, set_stem_references

from .toys import LinearSites, ReluSites, TinyConvNet, on_grid

SHAPE = (3, 8, 8)
FP32 = AttackConfig(steps=60, batch_size=16, autocast_dtype=None, fold_batchnorm=False)


def _pgd(engine: AttackEngine, x: Tensor, site: Tensor, sign: Tensor, eps: Tensor) -> Tensor:
    engine.prepare(x)
    delta, _ = engine.pgd(x, site, sign, eps.float(), list(range(x.shape[0])), 11)
    return delta


def test_pgd_reaches_the_known_optimum_of_a_linear_site() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, *SHAPE, generator=g)
    engine = AttackEngine(LinearSites(w), FP32)
    x = torch.full((4, *SHAPE), 0.5)  # far from the box: the optimum is x + sign·ε·w/‖w‖
    site = torch.tensor([0, 0, 1, 1])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    eps = torch.full((4,), 0.5)
    delta = _pgd(engine, x, site, sign, eps)
    w_rows = w[site]
    optimum = (
        sign.view(-1, 1, 1, 1)
        * eps.view(-1, 1, 1, 1)
        * w_rows
        / w_rows.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    )
    assert float((delta - optimum).flatten(1).norm(dim=1).max()) < 1e-3 * 0.5
    change = (delta * w_rows).flatten(1).sum(dim=1) * sign
    assert torch.allclose(change, 0.5 * w_rows.flatten(1).norm(dim=1), rtol=1e-5)


def _box_optimum(x: np.ndarray, w: np.ndarray, eps: float) -> float:
    """max w·δ over ‖δ‖ ≤ ε, −x ≤ δ ≤ 1 − x by bisection on the KKT multiplier (float64)."""
    lo_b, hi_b = -x, 1.0 - x

    def point(mu: float) -> np.ndarray:
        return np.clip(w / mu, lo_b, hi_b)

    lo, hi = 1e-12, 1e12
    for _ in range(400):
        mid = np.sqrt(lo * hi)
        if np.linalg.norm(point(mid)) > eps:
            lo = mid
        else:
            hi = mid
    return float(w.ravel() @ point(hi).ravel())


def test_pgd_reaches_the_box_constrained_optimum_of_a_linear_site() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, *SHAPE, generator=g)
    x = on_grid(torch.rand(3, *SHAPE, generator=g))
    x[0, :, :4] = 1.0  # saturated halves: the box binds
    x[1, :, 4:] = 0.0
    eps = torch.tensor([0.5, 1.0, 3.0])
    engine = AttackEngine(LinearSites(w), AttackConfig(**{**FP32.__dict__, "steps": 100}))
    delta = _pgd(engine, x, torch.zeros(3, dtype=torch.int64), torch.ones(3), eps)
    got = (delta * w).flatten(1).sum(dim=1).double()
    for i in range(3):
        best = _box_optimum(x[i].double().numpy(), w[0].double().numpy(), float(eps[i]))
        assert best * (1 - 2e-3) <= float(got[i]) <= best * (1 + 1e-5)


def test_both_signs_run_and_the_larger_change_is_kept() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*SHAPE, generator=g)
    x = on_grid(torch.full((1, *SHAPE), 0.5))
    bias = 0.5 - float((w * x[0]).sum())  # relu(w·x + b) = 0.5 at the clean image
    model = ReluSites(w, bias)
    eps = 0.2  # ε‖w‖ ≈ 2.8: rising is easy, falling stops at the relu floor
    rows = AttackRows.grid([0, 0], [0, 1], [eps])
    result = AttackEngine(model, FP32).run(x, rows, generator=torch.Generator().manual_seed(0))
    assert result.sign.tolist() == [1, -1, 1, -1]
    change = result.predicted_change
    reach = eps * float(w.norm())
    assert float(change[0]) > 0.95 * reach
    assert -0.5001 <= float(change[1]) < 0
    assert 0 < float(change[2]) <= 0.5001
    assert float(change[3]) < -0.95 * reach
    kept = select_largest_change(result)
    assert kept.site_index.tolist() == [0, 1]
    assert kept.sign.tolist() == [1, -1]


def test_selection_picks_max_abs_change_per_image_site_eps() -> None:
    n = 6
    result = AttackResult(
        row_index=torch.arange(n),
        image_index=torch.tensor([0, 0, 0, 0, 1, 1]),
        site_index=torch.tensor([3, 3, 3, 3, 3, 3]),
        sign=torch.tensor([1, -1, 1, -1, 1, -1], dtype=torch.int8),
        eps_l2=torch.tensor([1.0, 1.0, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64),
        realised_eps_l2=torch.zeros(n, dtype=torch.float64),
        delta_levels=torch.zeros((n, 1, 1, 1), dtype=torch.int16),
        f_clean=torch.zeros(n),
        f_adv=torch.tensor([0.5, -0.7, 0.9, -0.1, 0.2, -0.2]),
        f_adv_unquantised=torch.zeros(n),
    )
    assert select_largest_change(result).row_index.tolist() == [1, 2, 4]


def test_outputs_respect_eps_after_quantisation_and_record_the_generating_model() -> None:
    model = TinyConvNet(n_sites=3)
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, *SHAPE, generator=g)
    images[0] = 1.0
    rows = AttackRows.grid([0, 1, 2, 2], [0, 1, 2, 0], [0.1, 0.5, 2.0], restarts=2)
    cfg = AttackConfig(steps=10, batch_size=7)
    result = AttackEngine(model, cfg).run(images, rows, generator=torch.Generator().manual_seed(1))
    assert len(result) == len(rows) == 48
    assert torch.equal(result.row_index, torch.arange(48))
    assert bool((result.realised_eps_l2 <= result.eps_l2).all())
    s = result.delta_levels.to(torch.int64).square().flatten(1).sum(dim=1)
    assert bool((s.double().sqrt() / 255 <= result.eps_l2).all())
    clean = to_levels(images)
    adv = result.adversarial_levels(clean)
    with torch.no_grad():
        f_adv = model(from_levels(adv)).gather(1, result.site_index.unsqueeze(1)).squeeze(1)
        f_clean = model(from_levels(clean))[result.image_index, result.site_index]
    assert torch.allclose(result.f_adv, f_adv, atol=1e-5)
    assert torch.allclose(result.f_clean, f_clean, atol=1e-5)
    assert float((result.sign.float() * result.predicted_change).min()) > 0


def test_runs_are_reproducible_and_independent_of_batching() -> None:
    model = TinyConvNet(n_sites=2, seed=3)
    images = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    rows = AttackRows.grid([0, 1], [0, 1], [0.5, 1.0])
    cfg = AttackConfig(steps=5, batch_size=8, autocast_dtype=None)

    def run(seed: int, batch: int) -> AttackResult:
        engine = AttackEngine(model, AttackConfig(**{**cfg.__dict__, "batch_size": batch}))
        return engine.run(images, rows, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0, 8), run(0, 8), run(1, 8)
    assert torch.equal(a.delta_levels, b.delta_levels)
    assert torch.equal(a.f_adv, b.f_adv)
    assert not torch.equal(a.delta_levels, c.delta_levels)
    d = run(0, 3)
    assert torch.allclose(a.f_adv, d.f_adv, atol=1e-4)
    assert float((a.delta_levels != d.delta_levels).float().mean()) < 0.01


def test_split_first_layer_keeps_the_perturbation_under_bf16_autocast() -> None:
    """conv(x) exact + conv(δ) in bf16: the perturbation term is kept to bf16 precision of δ."""
    model = TinyConvNet(n_sites=2)
    engine = AttackEngine(model, AttackConfig(steps=2, batch_size=4))
    x = on_grid(torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(6)))
    fast = engine.prepare(x)
    stems = [m for m in fast.modules() if isinstance(m, SplitStem)]
    assert len(stems) == 1
    assert stems[0].padded_channels == 8
    site = torch.zeros(4, dtype=torch.int64)
    engine.pgd(x, site, torch.ones(4), torch.full((4,), 0.2), [0, 1, 2, 3], 0, steps=0)
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) * 1e-3
    conv = stems[0].conv
    seen: dict[str, Tensor] = {}
    second = next(m for m in fast.modules() if isinstance(m, FusedConvReLU))  # conv1 + relu
    hook = second.register_forward_pre_hook(lambda _m, a: seen.__setitem__("second", a[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term = stems[0].perturbation_term(x + delta).float()
        out = stems[0](x + delta).float()
        fast(x + delta)
    hook.remove()
    exact = conv._conv_forward(delta, conv.weight, None)
    assert float((term - exact).norm() / exact.norm()) < 0.01
    cast_whole = conv((x + delta).bfloat16().float()) - conv(x)  # what the split avoids
    assert float((cast_whole - exact).norm() / exact.norm()) > 0.2
    # The layer's output itself is exact fp32 conv(x + δ) rounded once to bf16.
    full = conv(x + delta)
    assert torch.allclose(out, full, rtol=2**-8, atol=1e-6)
    assert seen["second"].dtype == torch.bfloat16  # the rest of the network does run in bf16


def test_split_first_layer_gradient_matches_fp32() -> None:
    conv = torch.nn.Conv2d(3, 6, 5, stride=2, padding=2, bias=True)
    stem = SplitStem(conv)
    g = torch.Generator().manual_seed(3)
    x = on_grid(torch.rand(2, 3, 20, 20, generator=g))
    w = torch.randn(2, 6, 10, 10, generator=g)
    stem.set_reference(x)
    z = (x + 1e-3 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (stem(z).float() * w).sum().backward()
    assert z.grad is not None
    zf = z.detach().clone().requires_grad_(True)
    (conv(zf) * w).sum().backward()
    assert zf.grad is not None
    assert float((z.grad - zf.grad).norm() / zf.grad.norm()) < 0.01
    # Without autocast, or for another batch shape, it is the plain fp32 convolution.
    assert torch.equal(stem(z.detach()), conv(z.detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        other = stem(x[:1])
    assert torch.allclose(other.float(), conv(x[:1]), atol=1e-2)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"),
    [([1, 1], [0, 0], [1, 1], 1), ([2, 2], [3, 1], [1, 1], 1), ([1, 2], [1, 1], [2, 1], 2)],
)
def test_perturbation_conv_is_conv2d_with_its_input_gradient(
    stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> None:
    g = torch.Generator().manual_seed(11)
    delta = torch.randn(2, 4, 11, 10, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(6, 4 // groups, 3, 4, generator=g, dtype=torch.float64)
    args = (stride, padding, dilation, groups)
    out = perturbation_conv(delta, weight, *args)
    ref = torch.nn.functional.conv2d(delta, weight, None, *args)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda d: perturbation_conv(d, weight, *args), (delta,))
    torch.library.opcheck(perturbation_conv, (delta.detach(), weight, *args))


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv2d(3, 4, 3, padding="same", bias=False),
        torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False),
        torch.nn.Conv2d(3, 4, 3, stride=1, padding=2, dilation=2, bias=False),
    ],
)
def test_split_stem_perturbation_term_of_other_convolutions(conv: torch.nn.Conv2d) -> None:
    stem = SplitStem(conv)
    assert stem.block == 1
    g = torch.Generator().manual_seed(13)
    x = torch.rand(2, 3, 9, 8, generator=g)
    delta = torch.randn(x.shape, generator=g, requires_grad=True)
    stem.set_reference(x)
    term = stem.perturbation_term(x + delta)
    exact = conv._conv_forward(delta, conv.weight, None)
    assert torch.allclose(term, exact, atol=1e-5)
    w = torch.randn(term.shape, generator=g)
    (got,) = torch.autograd.grad((term * w).sum(), delta)
    (want,) = torch.autograd.grad((exact * w).sum(), delta)
    assert torch.allclose(got, want, atol=1e-5)


def test_perturbation_conv_backward_reads_the_gradient_in_its_own_dtype_and_layout() -> None:
    """Whatever layout the incoming gradient has, the data-gradient convolution gets it in the
    convolution's layout (channels_last here) and dtype, converted in one pass before the call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[Tensor] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.convolution_backward.default:
                seen.append(args[0])
            return func(*args, **(kwargs or {}))

    cl = torch.channels_last
    g = torch.Generator().manual_seed(12)
    conv = torch.nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    stem = SplitStem(conv).to(memory_format=cl)
    x = on_grid(torch.rand(2, 3, 32, 32, generator=g)).contiguous(memory_format=cl)
    stem.set_reference(x)
    z = (x + 1e-3 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stem(z)
    upstream = torch.randn(out.shape, generator=g).contiguous()  # fp32, NCHW
    with Spy():
        out.backward(upstream.to(out.dtype))
    (grad,) = seen
    assert grad.dtype == torch.bfloat16
    assert grad.is_contiguous(memory_format=cl)
    assert not grad.is_contiguous()
    assert z.grad is not None
    zf = z.detach().clone().requires_grad_(True)
    (conv(zf) * upstream).sum().backward()
    assert zf.grad is not None
    assert float((z.grad - zf.grad).norm() / zf.grad.norm()) < 0.01


@pytest.mark.parametrize("output_block", [1, 2, 3])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "hw"),
    [
        (7, 2, 3, (224, 224)),
        (7, 2, 3, (31, 29)),
        (3, 2, 1, (17, 18)),
        (4, 2, 0, (16, 15)),
        (5, 3, 1, (20, 23)),
        (3, 1, 1, (9, 9)),
    ],
)
def test_space_to_depth_stem_equals_the_strided_convolution(
    kernel: int, stride: int, padding: int, hw: tuple[int, int], output_block: int
) -> None:
    """The blocked stem is the strided convolution, forward and input gradient, for any output
    block (t×t outputs per position from (s·t)² input blocks), also where t does not divide the
    output size."""
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    conv = torch.nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    stem = SplitStem(conv, output_block=output_block)
    assert stem.block == stride
    assert stem.output_block == (output_block if stride > 1 else 1)
    assert stem.padded_channels % 8 == 0
    x = torch.rand(2, 3, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    delta = torch.randn(x.shape, generator=g)
    stem.set_reference(x)
    z = (x + delta).requires_grad_(True)
    term = stem.perturbation_term(z)
    d = delta.clone().requires_grad_(True)
    exact = conv(d)
    assert term.shape == exact.shape
    assert float((term - exact).detach().abs().max() / exact.detach().abs().max()) < 1e-5
    upstream = torch.randn(exact.shape, generator=g)
    (term * upstream).sum().backward()
    (exact * upstream).sum().backward()
    assert z.grad is not None
    assert d.grad is not None
    assert float((z.grad - d.grad).abs().max() / d.grad.abs().max()) < 1e-5


def test_stem_output_blocks_widen_the_convolution() -> None:
    """ResNet's 7×7/2 stem on 3 channels: 4×4 from 12 (padded to 16) to 64 channels with t = 1,
    3×3 from 48 to 256 with t = 2."""
    conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    assert tuple(SplitStem(conv, output_block=1).weight_padded.shape) == (64, 16, 4, 4)
    assert tuple(SplitStem(conv, output_block=2).weight_padded.shape) == (256, 48, 3, 3)
    with pytest.raises(ValueError, match="output_block must be >= 1, got 0"):
        SplitStem(conv, output_block=0)


@pytest.mark.parametrize(("output_block", "hw"), [(2, (64, 64)), (2, (62, 58)), (1, (64, 64))])
def test_a_split_stem_that_pools_is_the_pool_of_the_stem(
    output_block: int, hw: tuple[int, int]
) -> None:
    """A split stem with ``max_pool`` is the 3×3/2 pool of its output, under autocast (where with
    2×2 output blocks it pools them as computed, its references kept in blocks) and without."""
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 8, 7, stride=2, padding=3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    plain = SplitStem(conv, output_block=output_block)
    pooled = SplitStem(conv, output_block=output_block)
    pooled.max_pool = True
    x = on_grid(torch.rand(4, 3, *hw, generator=g))
    for stem in (plain, pooled):
        stem.set_reference(x[:2], torch.tensor([0, 0, 1, 1]))
    ho, wo = (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1
    in_blocks = output_block == 2 and ho % 2 == 0 and wo % 2 == 0
    want = (2, 8 * 4, ho // 2, wo // 2) if in_blocks else (2, 8, ho, wo)
    assert tuple(pooled.ref_output[:2].shape) == want
    z = x[[0, 0, 1, 1]] + 1e-2 * torch.randn(4, 3, *hw, generator=g)
    upstream = torch.randn(4, 8, (ho - 1) // 2 + 1, (wo - 1) // 2 + 1, generator=g)
    for autocast in (True, False):
        za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = pooled(za)
            ref = F.max_pool2d(plain(zb), 3, 2, 1)
        assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(out, ref)
        (out.float() * upstream).sum().backward()
        (ref.float() * upstream).sum().backward()
        assert za.grad is not None
        assert zb.grad is not None
        assert float((za.grad - zb.grad).abs().max() / zb.grad.abs().max()) < 1e-6


def test_the_engine_pools_in_the_split_stem_of_a_resnet() -> None:
    """fuse_conv_relu hands the ResNet stem's max pool to the split stem, whose only consumer it
    is (through the ReLU, which moves after the pool, and the Identity folding leaves)."""
    from itloop.models import ITModel
    from itloop.stimulus.pooling import MaxPool3x3s2

    model = ITModel.build("resnet18", 3, input_hw=(32, 32), seed=0)
    x = on_grid(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    fast = AttackEngine(model, AttackConfig(batch_size=2)).prepare(x)
    stems = [m for m in fast.modules() if isinstance(m, SplitStem)]
    assert len(stems) == 1
    assert stems[0].max_pool
    assert not any(isinstance(m, (MaxPool3x3s2, nn.MaxPool2d)) for m in fast.modules())
    unfused = AttackEngine(model, AttackConfig(batch_size=2, fuse_conv_relu=False)).prepare(x)
    assert not next(m for m in unfused.modules() if isinstance(m, SplitStem)).max_pool
    stem = stems[0]
    stem.set_reference(x)
    stem.max_pool = False  # the references were kept for pooling in blocks: they are dropped
    assert stem.ref_index.numel() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stem(x).dtype == torch.bfloat16  # the plain convolution until set again


def test_first_layer_input_stays_fp32_without_the_split() -> None:
    model = TinyConvNet(n_sites=2)
    engine = AttackEngine(model, AttackConfig(steps=2, batch_size=4, split_first_conv=False))
    x = on_grid(torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(6)))
    fast = engine.prepare(x)
    wrapped = [m for m in fast.modules() if isinstance(m, Fp32Input)]
    assert len(wrapped) == 1
    seen: dict[str, Tensor] = {}
    h0 = wrapped[0].layer.register_forward_pre_hook(lambda _m, a: seen.__setitem__("first", a[0]))
    second = next(m for m in fast.modules() if isinstance(m, FusedConvReLU))
    h1 = second.register_forward_pre_hook(lambda _m, a: seen.__setitem__("second", a[0]))
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) * 1e-3
    site = torch.zeros(4, dtype=torch.int64)
    engine.pgd(x, site, torch.ones(4), torch.full((4,), 0.2), [0, 1, 2, 3], 0, steps=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x + delta)
    h0.remove()
    h1.remove()
    assert seen["first"].dtype == torch.float32
    assert torch.equal(seen["first"], x + delta)
    assert seen["second"].dtype == torch.bfloat16  # the rest of the network does run in bf16


def test_bf16_input_would_distort_a_small_perturbation() -> None:
    """Why the first layer stays fp32: at ε = 1 on 3×224×224, bf16 rounding of x + δ is large."""
    g = torch.Generator().manual_seed(0)
    x = on_grid(torch.rand(1, 3, 224, 224, generator=g))
    d = torch.randn(1, 3, 224, 224, generator=g)
    d = d / d.norm()
    kept_bf16 = (x + d).bfloat16().float() - x
    kept_fp32 = (x + d) - x
    assert float((kept_bf16 - d).norm()) > 0.2
    assert float((kept_fp32 - d).norm()) < 1e-5


def test_budget_violations_raise_naming_the_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    real = attacks_module.project_l2_box_step

    def leaky(
        x: Tensor, delta: Tensor, direction: Tensor, alpha: Tensor, eps: Tensor, **kw: int
    ) -> Tensor:
        return real(x, delta, direction, alpha, eps * 1.5, iterations=4)

    monkeypatch.setattr(attacks_module, "project_l2_box_step", leaky)
    w = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(8))
    engine = AttackEngine(LinearSites(w), FP32)
    rows = AttackRows.grid([0], [0], [0.5])
    with pytest.raises(AttackError, match=r"perturbation L2 0\.7\d* exceeds budget 0\.5"):
        engine.run(torch.full((1, *SHAPE), 0.5), rows, generator=torch.Generator().manual_seed(0))


def test_quantisation_aware_rounding_keeps_the_predicted_change() -> None:
    w = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(9))
    images = on_grid(torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(10)))
    rows = AttackRows.grid([0, 1, 2, 3], [0, 0, 0, 0], [0.05], signs=(1,))
    # two steps from a random start: δ is not yet along ∇f, so the gradient is what guides rounding
    cfg = AttackConfig(**{**FP32.__dict__, "steps": 2})
    aware = AttackEngine(LinearSites(w), cfg).run(
        images, rows, generator=torch.Generator().manual_seed(0)
    )
    plain_cfg = AttackConfig(**{**cfg.__dict__, "quantisation_aware": False})
    plain = AttackEngine(LinearSites(w), plain_cfg).run(
        images, rows, generator=torch.Generator().manual_seed(0)
    )
    assert bool((aware.predicted_change >= plain.predicted_change - 1e-6).all())
    assert float(aware.predicted_change.sum()) > float(plain.predicted_change.sum())
    assert bool((aware.realised_eps_l2 <= 0.05).all())


def test_fold_batchnorm_computes_the_same_function_without_batchnorm() -> None:
    model = TinyConvNet(n_sites=3)
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(11))
    folded = fold_batchnorm(model, x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(model.train(), x)


def test_rows_are_validated_with_the_offending_value() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\]|2"):
        AttackRows(
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64),
            torch.ones(2, dtype=torch.float64),
            torch.tensor([1, 2], dtype=torch.int8),
        )
    rows = AttackRows.grid([0, 1], [5, 6], [0.5, 1.0], signs=(1, -1), restarts=3)
    assert len(rows) == 2 * 2 * 3 * 2
    assert rows.sign[:2].tolist() == [1, -1]
    engine = AttackEngine(TinyConvNet(), FP32)
    with pytest.raises(ValueError, match="image_index 1 is out of range for 1 images"):
        engine.run(torch.rand(1, *SHAPE), rows, generator=torch.Generator().manual_seed(0))


def test_config_refuses_unknown_1x1_modes_and_cpu_gemm_templates() -> None:
    with pytest.raises(ValueError, match=r"matmul_1x1 must be one of .* got 'gemm'"):
        AttackConfig(matmul_1x1="gemm")
    engine = AttackEngine(TinyConvNet(n_sites=2, seed=0), AttackConfig(gemm_templates=True))
    with pytest.raises(ValueError, match="Triton GEMMs for CUDA; the batch is on cpu"):
        engine.prepare(torch.rand(2, *SHAPE))


def test_results_of_a_cpu_run_are_copied_as_they_are() -> None:
    k = torch.randint(-255, 256, (2, 3, 4, 4), dtype=torch.int16)
    f = torch.randn(4)[::2]
    host_k, host_f = attacks_module._to_host(k, f)
    assert torch.equal(host_k, k)
    assert torch.equal(host_f, f)
    assert host_k.dtype == torch.int16
    assert host_f.shape == (2,)


def test_the_split_stem_rounds_only_the_perturbation_when_the_model_normalises_first() -> None:
    """A backbone normalises [0, 1] images before its first convolution. The split stem's
    reference is the normalised clean batch, so what it rounds to bf16 is δ / std; with the raw
    images as reference it rounded the normalisation's full-size change (up to 2 per pixel) and,
    with it, much of a small δ."""
    from itloop.models import ITModel

    model = ITModel.build("resnet18", 3, input_hw=(32, 32), seed=0)
    engine = AttackEngine(model, AttackConfig(batch_size=4, fuse_conv_relu=False))
    x = on_grid(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    fast = engine.prepare(x)
    engine._set_reference(x)
    stem = next(m for m in fast.modules() if isinstance(m, SplitStem))
    mean, std = model.backbone.mean, model.backbone.std
    assert torch.allclose(stem.ref_input, (x - mean) / std, atol=1e-6)
    seen: dict[str, Tensor] = {}
    stem.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].detach()))
    d = 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    engine._grad(x + d, torch.zeros(4, dtype=torch.int64), torch.ones(4))
    assert torch.allclose(seen["z"] - stem.ref_input, d / std, atol=1e-6)


def test_a_split_stem_the_forward_never_reaches_is_named() -> None:
    class Detour(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = SplitStem(nn.Conv2d(3, 4, 3))
            self.used = nn.Conv2d(3, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    with pytest.raises(RuntimeError, match=r"never reached the split stem.*unused"):
        set_stem_references(Detour(), torch.rand(2, *SHAPE))


def test_rows_that_share_an_image_share_its_stem_reference() -> None:
    """The split stem keeps one reference per distinct image of the batch and maps rows to them;
    the attack is the one it would be with a reference per row, and the buffers stay in place
    from batch to batch (a compiled model reading them is not recompiled)."""
    from itloop.models import ITModel

    model = ITModel.build("resnet18", 3, input_hw=(32, 32), seed=0)
    cfg = AttackConfig(steps=3, batch_size=6, fuse_conv_relu=False)
    images = on_grid(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    x = images[index]
    site = torch.tensor([0, 0, 1, 1, 2, 2])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    eps = torch.full((6,), 0.5)
    per_row = AttackEngine(model, cfg)
    per_row.prepare(x)
    d_rows, f_rows = per_row.pgd(x, site, sign, eps, list(range(6)), 3)
    shared = AttackEngine(model, cfg)
    fast = shared.prepare(x)
    d_shared, f_shared = shared.pgd(x, site, sign, eps, list(range(6)), 3, clean=(images, index))
    assert torch.equal(d_shared, d_rows)
    assert torch.equal(f_shared, f_rows)
    stem = next(m for m in fast.modules() if isinstance(m, SplitStem))
    mean, std = model.backbone.mean, model.backbone.std
    assert torch.equal(stem.ref_index, index)
    assert stem.ref_input.shape[0] == 6  # room for a batch of distinct images
    assert torch.allclose(stem.ref_input[:3], (images - mean) / std, atol=1e-6)
    pointers = (stem.ref_input.data_ptr(), stem.ref_output.data_ptr())
    two = torch.tensor([1, 1, 1, 0, 0, 0])
    shared.pgd(images[:2][two], site, sign, eps, list(range(6)), 3, clean=(images[:2], two))
    assert (stem.ref_input.data_ptr(), stem.ref_output.data_ptr()) == pointers
    assert torch.equal(stem.ref_index, two)
    with pytest.raises(
        ValueError, match=r"index must point into the 2 references, got range 0\.\.5"
    ):
        stem.set_reference(images[:2], torch.arange(6))
    with pytest.raises(ValueError, match=r"clean's index must be \(6,\), got \(5,\)"):
        shared.pgd(x, site, sign, eps, list(range(6)), 3, clean=(images, index[:5]))


def test_the_loop_keeps_images_perturbation_and_gradient_in_one_layout() -> None:
    """Images arriving channels_last are taken as NCHW, the layout of δ and of the gradient, so
    that every pass of the step reads x, δ and the gradient in one order."""
    from itloop.models import ITModel

    model = ITModel.build("resnet18", 2, input_hw=(32, 32), seed=0)
    engine = AttackEngine(model, AttackConfig(steps=2, batch_size=2, fuse_conv_relu=False))
    x = on_grid(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    x = x.contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    engine.prepare(x)
    seen: list[tuple[bool, bool]] = []
    grad = engine._grad

    def recording(z: Tensor, site: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
        g, v = grad(z, site, sign)
        seen.append((z.is_contiguous(), g.is_contiguous()))
        return g, v

    engine._grad = recording  # type: ignore[method-assign]
    delta, _ = engine.pgd(
        x, torch.tensor([0, 1]), torch.tensor([1.0, -1.0]), torch.ones(2), [0, 1], 0
    )
    assert seen == [(True, True)] * 2
    assert delta.is_contiguous()


def test_the_compiled_stem_that_pools_in_blocks_is_the_compiled_stem_and_pool() -> None:
    """Compiled, the split stem that pools its 2×2 output blocks has the gradient of the stem
    followed by the pool, bit for bit; both pool the fp32 sum of the clean and perturbation terms,
    which the compiler does not round to bf16 in between."""
    from itloop.stimulus.pooling import max_pool_3x3_s2

    cl = torch.channels_last
    g = torch.Generator().manual_seed(13)
    conv = torch.nn.Conv2d(3, 16, 7, stride=2, padding=3).requires_grad_(False)
    pooled = SplitStem(conv).to(memory_format=cl)
    pooled.max_pool = True
    plain = SplitStem(conv).to(memory_format=cl)
    x = on_grid(torch.rand(4, 3, 32, 32, generator=g)).contiguous(memory_format=cl)
    for stem in (pooled, plain):
        stem.set_reference(x)
    w = torch.randn(4, 16, 8, 8, generator=g)
    z = (x + 1e-2 * torch.randn(x.shape, generator=g)).requires_grad_(True)

    def in_blocks(z: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (pooled(z).float() * w).sum()

    def stem_then_pool(z: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (max_pool_3x3_s2(plain(z)).float() * w).sum()

    (got,) = torch.autograd.grad(torch.compile(in_blocks, dynamic=False)(z), z)
    (want,) = torch.autograd.grad(torch.compile(stem_then_pool, dynamic=False)(z), z)
    assert torch.equal(got, want)
    zf = z.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = plain.ref_output[plain.ref_index] + plain.perturbation_term(zf).float()
    (fp32_sum,) = torch.autograd.grad((F.max_pool2d(y, 3, 2, 1) * w).sum(), zf)
    assert float((got - fp32_sum).norm() / fp32_sum.norm()) < 1e-5


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_a_bf16_gradient_is_the_fp32_gradient_rounded(autocast: torch.dtype | None) -> None:
    """With gradient_dtype bf16 the loop differentiates by a zero probe of that dtype: the model
    sees the same fp32 input, and the gradient is the fp32 one rounded once, in its layout."""
    from itloop.models import ITModel

    model = ITModel.build("resnet18", 3, input_hw=(32, 32), seed=0)
    z = on_grid(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    site, sign = torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    grads = {}
    for dtype in (None, torch.bfloat16):
        config = AttackConfig(steps=1, batch_size=4, autocast_dtype=autocast, gradient_dtype=dtype)
        engine = AttackEngine(model, config)
        engine.prepare(z)
        engine._set_reference(z)
        grads[dtype] = engine._grad(z, site, sign)
    (g32, v32), (g16, v16) = grads[None], grads[torch.bfloat16]
    assert g32.dtype == torch.float32
    assert g16.dtype == torch.bfloat16
    assert g16.shape == z.shape
    assert g16.stride() == g32.stride()
    assert torch.equal(v16, v32)  # the probe changes no input value
    assert float(g32.abs().max()) > 0
    assert torch.equal(g16, g32.to(torch.bfloat16))


def test_pgd_with_a_bf16_gradient_reaches_the_box_constrained_optimum() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, *SHAPE, generator=g)
    x = on_grid(torch.rand(3, *SHAPE, generator=g))
    x[0, :, :4] = 1.0
    x[1, :, 4:] = 0.0
    eps = torch.tensor([0.5, 1.0, 3.0])
    config = AttackConfig(**{**FP32.__dict__, "steps": 100, "gradient_dtype": torch.bfloat16})
    delta = _pgd(AttackEngine(LinearSites(w), config), x, torch.zeros(3, dtype=torch.int64),
                 torch.ones(3), eps)  # fmt: skip
    norms = delta.flatten(1).norm(dim=1)
    assert bool((norms <= eps * (1 + 1e-5)).all())
    assert float((x + delta).min()) >= 0.0
    assert float((x + delta).max()) <= 1.0
    got = (delta * w).flatten(1).sum(dim=1).double()
    for i in range(3):
        best = _box_optimum(x[i].double().numpy(), w[0].double().numpy(), float(eps[i]))
        assert best * (1 - 2e-3) <= float(got[i]) <= best * (1 + 1e-5)


def test_config_refuses_a_gradient_dtype_that_is_not_a_float() -> None:
    with pytest.raises(ValueError, match=r"gradient_dtype must be a float dtype, got torch.int16"):
        AttackConfig(gradient_dtype=torch.int16)
