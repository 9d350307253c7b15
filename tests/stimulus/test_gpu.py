"""The engine on a CUDA device: bf16 + compile + channels_last, budgets and the fp32 first layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itloop.stimulus import (
    AttackConfig,
    AttackEngine,
    AttackRows,
    Fp32Input,
    SplitStem,
    exact_fp32,
    from_levels,
    fused_step,
    gaussian_noise_control,
    project_l2_box,
    to_levels,
)
from itloop.stimulus.attacks import _pgd_step

from .toys import TinyConvNet, on_grid, step_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_attack_respects_eps_and_matches_cpu_quality(compiled: bool) -> None:
    model = TinyConvNet(n_sites=4).cuda()
    g = torch.Generator().manual_seed(0)
    images = on_grid(torch.rand(6, 3, 16, 16, generator=g)).cuda()
    rows = AttackRows.grid([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0.25, 1.0])
    cfg = AttackConfig(steps=20, batch_size=8, compile=compiled)
    result = AttackEngine(model, cfg).run(images, rows, generator=torch.Generator().manual_seed(1))
    assert bool((result.realised_eps_l2 <= result.eps_l2).all())
    assert float((result.sign.float() * result.predicted_change).min()) > 0
    cpu_model = TinyConvNet(n_sites=4)
    cpu_cfg = AttackConfig(steps=20, batch_size=8, autocast_dtype=None)
    cpu = AttackEngine(cpu_model, cpu_cfg).run(
        images.cpu(), rows, generator=torch.Generator().manual_seed(1)
    )
    gpu_gain = float((result.sign.float() * result.predicted_change).mean())
    cpu_gain = float((cpu.sign.float() * cpu.predicted_change).mean())
    assert gpu_gain > 0.95 * cpu_gain


def test_cuda_first_layer_input_is_fp32_without_the_split() -> None:
    model = TinyConvNet(n_sites=2).cuda()
    x = on_grid(torch.rand(4, 3, 16, 16, device="cuda"))
    cfg = AttackConfig(batch_size=4, split_first_conv=False)
    fast = AttackEngine(model, cfg).prepare(x)
    seen: list[torch.dtype] = []
    first = next(m for m in fast.modules() if isinstance(m, Fp32Input))
    first.layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(x)
    assert seen == [torch.float32]
    assert out.dtype in (torch.bfloat16, torch.float32)


def test_cuda_split_stem_keeps_the_perturbation() -> None:
    conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False).cuda().requires_grad_(False)
    stem = SplitStem(conv)
    x = on_grid(torch.rand(8, 3, 64, 64, device="cuda")).contiguous(
        memory_format=torch.channels_last
    )
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.25  # ε = 1 at 224 px
    stem.set_reference(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        term = stem.perturbation_term(x + delta).float()
    with exact_fp32():
        exact = conv(delta)
        whole = conv((x + delta).bfloat16().float()) - conv(x)
    assert float((term - exact).norm() / exact.norm()) < 0.01
    assert float((whole - exact).norm() / exact.norm()) > 0.05


# some torch releases warn while compiling an autograd.Function (the pool's) that they build
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize(("output_block", "max_pool"), [(1, False), (2, False), (2, True)])
def test_cuda_compiled_stem_backward_converts_no_gradient_inside_the_convolution(
    output_block: int, max_pool: bool
) -> None:
    """The stem's data-gradient convolution gets its gradient in its dtype and layout from the
    compiled graph: cuDNN's entry point then copies nothing (an fp32 NCHW gradient cost two extra
    passes over the full-resolution activation)."""
    from torch.profiler import ProfilerActivity, profile

    cl = torch.channels_last
    conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True).cuda().requires_grad_(False)
    stem = SplitStem(conv, output_block=output_block).to(memory_format=cl)
    stem.max_pool = max_pool
    x = on_grid(torch.rand(16, 3, 96, 96, device="cuda")).contiguous(memory_format=cl)
    stem.set_reference(x)
    out_hw = 24 if max_pool else 48
    w = torch.randn(16, 64, out_hw, out_hw, device="cuda")  # an fp32 NCHW upstream gradient

    def loss(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return (stem(z).float() * w).sum()

    compiled = torch.compile(loss, dynamic=False)
    z = (x + 1e-3 * torch.randn_like(x)).requires_grad_(True)
    (grad,) = torch.autograd.grad(compiled(z), z)  # compile and warm up
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities, record_shapes=True, acc_events=True) as prof:
        (grad,) = torch.autograd.grad(compiled(z), z)
        torch.cuda.synchronize()
    convs = [e for e in prof.events() if e.name == "aten::convolution_backward"]
    assert convs

    def copies(e: object) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for child in getattr(e, "cpu_children", []):
            if child.name in ("aten::copy_", "aten::_to_copy", "aten::clone"):
                out.append((child.name, child.input_shapes))
            out += copies(child)
        return out

    found = [c for e in convs for c in copies(e)]
    # the weight may be re-laid out; the gradient of the blocked convolution's output, (16, 64,
    # 48, 48) for 1×1 output blocks and (16, 256, 24, 24) for 2×2, must not be
    blocks = [16, int(stem.weight_padded.shape[0]), 48 // output_block, 48 // output_block]
    full_size = [c for c in found if blocks in list(c[1])]
    assert full_size == [], found
    zf = z.detach().clone().requires_grad_(True)
    if max_pool:
        # the pool's winners depend on whether the compiler rounds the stem's fp32 sum to bf16
        # before comparing (it may elide the rounding), so the reference pools the map both ways
        plain = SplitStem(conv, output_block=output_block).to(memory_format=cl)
        plain.set_reference(x)
        errors = []
        for rounded in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = plain.ref_output[plain.ref_index] + plain.perturbation_term(zf).float()
            y = y.bfloat16().float() if rounded else y
            (want,) = torch.autograd.grad((F.max_pool2d(y, 3, 2, 1) * w).sum(), zf)
            errors.append(float((grad - want).norm() / want.norm()))
        assert min(errors) < 1e-2, errors
    else:
        with exact_fp32():
            (want,) = torch.autograd.grad((conv(zf) * w).sum(), zf)
        assert float((grad - want).norm() / want.norm()) < 1e-2


def test_cuda_projection_and_controls_match_cpu() -> None:
    g = torch.Generator().manual_seed(2)
    x = on_grid(torch.rand(8, 3, 32, 32, generator=g))
    x[:4] = 1.0
    v = torch.randn(8, 3, 32, 32, generator=g)
    eps = torch.linspace(0.1, 3.0, 8)
    cpu = project_l2_box(x, v, eps)
    gpu = project_l2_box(x.cuda(), v.cuda(), eps.cuda()).cpu()
    assert float((cpu - gpu).abs().max()) < 1e-5
    lv = to_levels(x).cuda()
    out = gaussian_noise_control(lv, 1.0, generator=torch.Generator(device="cuda").manual_seed(0))
    assert bool((out.realised_eps_l2 <= 1.0).all())
    assert float(out.realised_eps_l2.min()) > 0.99
    assert from_levels(out.stimulus_levels(lv.cpu())).shape == x.shape


@pytest.mark.parametrize("residual", [False, True])
def test_cuda_fused_conv_relu_matches_the_composition(residual: bool) -> None:
    from itloop.stimulus.fusion import conv_bias_relu, cudnn_fusable

    g = torch.Generator(device="cuda").manual_seed(3)
    cl = torch.channels_last
    x = (
        torch.randn(8, 64, 28, 28, device="cuda", generator=g)
        .bfloat16()
        .contiguous(memory_format=cl)
    )
    w = (torch.randn(128, 64, 3, 3, device="cuda", generator=g) * 0.05).bfloat16()
    b = torch.randn(128, device="cuda", generator=g).bfloat16()
    z = torch.randn(8, 128, 14, 14, device="cuda", generator=g).bfloat16() if residual else None
    assert cudnn_fusable(x, w)
    args = ([2, 2], [1, 1], [1, 1], 1)
    xa = x.clone().requires_grad_(True)
    out = conv_bias_relu(xa, w, b, z, *args)
    assert out.is_contiguous(memory_format=cl)
    with exact_fp32():
        ref = torch.nn.functional.conv2d(x.float(), w.float(), b.float(), 2, 1)
        ref = torch.relu(ref if z is None else ref + z.float())
    assert float((out.detach().float() - ref).norm() / ref.norm()) < 1e-2
    gout = torch.randn(out.shape, device="cuda", generator=g).bfloat16()
    out.backward(gout)
    xr = x.float().requires_grad_(True)
    ref2 = torch.nn.functional.conv2d(xr, w.float(), b.float(), 2, 1)
    torch.relu(ref2 if z is None else ref2 + z.float()).backward(gout.float())
    assert xa.grad is not None
    assert xr.grad is not None
    assert float((xa.grad.float() - xr.grad).norm() / xr.grad.norm()) < 2e-2


def test_cuda_results_come_to_the_host_through_page_locked_buffers() -> None:
    from itloop.stimulus.attacks import _to_host

    k = torch.randint(-255, 256, (4, 3, 8, 8), dtype=torch.int16, device="cuda")
    f = torch.randn(4, device="cuda")[::2]  # not contiguous
    host_k, host_f, plain = _to_host(k, f, torch.arange(3))
    assert host_k.device.type == host_f.device.type == "cpu"
    assert host_k.is_pinned()
    assert host_f.is_pinned()
    assert torch.equal(host_k, k.cpu())
    assert torch.equal(host_f, f.cpu())
    assert torch.equal(plain, torch.arange(3))


def _cudnn_graphs_or_skip() -> None:
    from itloop.stimulus import cudnn_graphs

    why = cudnn_graphs.frontend_error()
    if why is not None:
        pytest.skip(f"cuDNN graph API unavailable: {why}")


@pytest.mark.parametrize(
    ("kernel", "stride", "residual", "relu_mask"),
    [(3, 1, False, True), (1, 1, True, True), (3, 2, False, True), (1, 1, True, False)],
)
def test_cuda_dgrad_epilogue_matches_the_composition(
    kernel: int, stride: int, residual: bool, relu_mask: bool
) -> None:
    _cudnn_graphs_or_skip()
    from itloop.stimulus import cudnn_graphs
    from itloop.stimulus.blocks import conv_input_grad

    g = torch.Generator(device="cuda").manual_seed(5)
    cl = torch.channels_last
    pad = kernel // 2

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, device="cuda", generator=g) * scale
        return t.bfloat16().contiguous(memory_format=cl)

    x = rnd(16, 64, 28, 28)
    w = rnd(96, 64, kernel, kernel, scale=0.05)
    ho = (28 + 2 * pad - kernel) // stride + 1
    dy = rnd(16, 96, ho, ho)
    r = rnd(16, 64, 28, 28) if residual else None
    out = conv_input_grad(dy, w, x, r, [stride] * 2, [pad] * 2, [1, 1], 1, relu_mask)
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=cl)
    built = [p for p in cudnn_graphs.plans() if p["input"] == list(x.shape)]
    assert built
    assert all(p["plan"] is not None for p in built), built
    with exact_fp32():
        xr = x.float().requires_grad_(True)
        y = torch.nn.functional.conv2d(xr, w.float(), None, stride, pad)
        (ref,) = torch.autograd.grad(y, xr, dy.float())
        if r is not None:
            ref = ref + r.float()
        if relu_mask:
            ref = torch.where(x > 0, ref, torch.zeros_like(ref))
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
    if relu_mask:  # the mask is exact: zero wherever the input is not positive
        assert bool((out[x <= 0] == 0).all())


def test_cuda_fused_blocks_keep_the_input_gradient() -> None:
    _cudnn_graphs_or_skip()
    from itloop.models import ITModel
    from itloop.stimulus.blocks import count_blocks

    model = ITModel.build("resnet50", 8, input_hw=(96, 96), seed=0).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(6, 3, 96, 96, device="cuda", generator=g)
    site = torch.arange(6, device="cuda") % 8
    sign = torch.tensor([1.0, -1.0] * 3, device="cuda")
    grads = []
    for fuse_blocks in (True, False):
        engine = AttackEngine(model, AttackConfig(fuse_blocks=fuse_blocks, batch_size=6))
        fast = engine.prepare(x)
        assert count_blocks(fast) == (14 if fuse_blocks else 0)
        engine._set_reference(x)
        grad, _ = engine._grad(x, site, sign)
        grads.append(grad.float())
    fused, plain = grads
    cos = torch.nn.functional.cosine_similarity(fused.flatten(1), plain.flatten(1), dim=1)
    assert float(cos.min()) > 0.99, cos
    assert float((fused - plain).norm() / plain.norm()) < 0.1


def test_cuda_row_draws_are_the_cpu_draws_compiled_or_not() -> None:
    """The counter-based generator draws the same words on any device: the normals agree with the
    CPU's to float rounding (log, sin, cos), eager and compiled."""
    from itloop.stimulus.randomness import normal_and_uniform, row_keys

    keys = row_keys(123, range(40, 72))
    z_cpu, u_cpu = normal_and_uniform(keys, 3 * 64 * 64)
    compiled = torch.compile(normal_and_uniform, dynamic=False)
    for draw in (normal_and_uniform, compiled):
        z, u = draw(keys.cuda(), 3 * 64 * 64)
        assert torch.allclose(z.cpu(), z_cpu, rtol=1e-5, atol=1e-5)
        assert torch.allclose(u.cpu(), u_cpu, rtol=0, atol=1e-7)


@pytest.mark.parametrize("iterations", [1, 2])
def test_cuda_triton_step_is_the_step(iterations: int) -> None:
    """The tiled Triton step against the step's torch arithmetic on full-size rows (37 tiles of
    3 × 224 × 224, the last one partial), every branch of the projection taken."""
    case = step_case(16, (3, 224, 224), "cuda")
    want = _pgd_step(**{**case, "best_delta": case["best_delta"].clone()},
                     iterations=iterations, keep_best=True)  # fmt: skip
    buffer = case["best_delta"].clone()
    got = fused_step.pgd_step(**{**case, "best_delta": buffer},
                              iterations=iterations, keep_best=True)  # fmt: skip
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], case["x"] + got[0], rtol=0, atol=0)
    for g, w in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert got[4] is buffer
    norms = got[0].double().flatten(1).norm(dim=1)
    assert bool((norms <= case["eps"].double() * (1 + 1e-6)).all())


def test_cuda_compiled_engine_steps_with_triton_and_attacks_as_before() -> None:
    model = TinyConvNet(n_sites=4).cuda()
    g = torch.Generator().manual_seed(0)
    images = on_grid(torch.rand(6, 3, 32, 32, generator=g)).cuda()
    rows = AttackRows.grid([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0.5, 2.0])
    results = []
    for triton_step in (True, False):
        engine = AttackEngine(
            model, AttackConfig(steps=20, batch_size=8, compile=True, triton_step=triton_step)
        )
        result = engine.run(images, rows, generator=torch.Generator().manual_seed(1))
        assert engine.uses_triton_step is triton_step
        assert bool((result.realised_eps_l2 <= result.eps_l2).all())
        results.append(float((result.sign.float() * result.predicted_change).mean()))
    assert results[0] == pytest.approx(results[1], rel=1e-3)


def test_cuda_compiled_bf16_gradient_comes_out_in_the_images_layout() -> None:
    """The compiled backward writes the bf16 gradient itself, NCHW like the images (the Triton
    step then copies nothing), and it is the fp32 gradient to bf16's precision; an attack with it
    keeps the budget and reaches the same predicted change."""
    from itloop.models import ITModel

    model = ITModel.build("resnet18", 4, input_hw=(64, 64), seed=0).cuda()
    g = torch.Generator().manual_seed(0)
    images = on_grid(torch.rand(6, 3, 64, 64, generator=g)).cuda()
    rows = AttackRows.grid([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0.5, 2.0])
    z = images[rows.image_index[:8].cuda()].contiguous()
    site, sign = rows.site_index[:8].cuda(), rows.sign[:8].float().cuda()
    grads, changes = {}, {}
    for dtype in (None, torch.bfloat16):
        config = AttackConfig(
            steps=20, batch_size=8, compile=True, triton_step=True, gradient_dtype=dtype
        )
        engine = AttackEngine(model, config)
        engine.prepare(z)
        engine._set_reference(z)
        grads[dtype] = engine._grad(z, site, sign)[0]
        result = engine.run(images, rows, generator=torch.Generator().manual_seed(1))
        assert bool((result.realised_eps_l2 <= result.eps_l2).all())
        changes[dtype] = float((result.sign.float() * result.predicted_change).mean())
    g32, g16 = grads[None], grads[torch.bfloat16]
    assert g16.dtype == torch.bfloat16
    assert g16.is_contiguous()
    assert g32.is_contiguous()
    scale = float(g32.abs().max())
    torch.testing.assert_close(g16.float(), g32, rtol=2e-2, atol=2e-2 * scale)
    assert changes[torch.bfloat16] == pytest.approx(changes[None], rel=2e-2)
