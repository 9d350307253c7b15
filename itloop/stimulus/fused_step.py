"""The PGD step's projection as Triton kernels that split each row over many programs.

:func:`itloop.stimulus.attacks._pgd_step` compiled by inductor is one kernel with one program per
row: at batch 512 that is 512 programs, each walking its 150,528 values four times (the step's
three sums, two active-set updates, the output). :func:`pgd_step` computes the same step with each
row cut into tiles of :data:`BLOCK` values, one program per tile, and one kernel per pass: the
sums of a pass are written per tile and every program of the next pass adds its row's partial
sums itself (in a fixed order, so a row's result depends on that row alone). The iterate's best
copy is stored only for the rows it improves, into the caller's buffer, and never read.

The arithmetic is :func:`itloop.stimulus.constraints.project_l2_box_step` and
:func:`itloop.stimulus.attacks._keep_better` step for step; only the order of the fp32 sums
differs. :func:`available` says whether it can run (CUDA tensors and Triton importable).
"""

# Triton's kernels name their compile-time constants in capitals and have no type annotations.
# ruff: noqa: N803

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from itloop.stimulus.constraints import _FLT_MIN, _STEP_NORM_MARGIN

__all__ = ["BLOCK", "available", "pgd_step"]

BLOCK = 4096
"""Values per program: 37 tiles of a 3 × 224 × 224 row."""

try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a Triton that cannot find its compiler
    triton = None
    _error: str | None = f"{type(exc).__name__}: {exc}"
else:
    _error = None

if triton is not None:

    @triton.jit
    def _row_sum(ptr, row, n_tiles, TILES: tl.constexpr):
        offs = tl.arange(0, TILES)
        return tl.sum(tl.load(ptr + row * n_tiles + offs, mask=offs < n_tiles, other=0.0), 0)

    @triton.jit
    def _scale(sums, row, n_tiles, alpha_ptr, eps_ptr, margin, flt_min, TILES: tl.constexpr):
        """(s, t₀, ε) of a row: the step's scale and the start of the active-set iteration."""
        d_sq = _row_sum(sums, row, n_tiles, TILES)
        cross = _row_sum(sums + 1 * tl.num_programs(0) * n_tiles, row, n_tiles, TILES)
        dir_sq = _row_sum(sums + 2 * tl.num_programs(0) * n_tiles, row, n_tiles, TILES)
        alpha = tl.load(alpha_ptr + row)
        eps = tl.load(eps_ptr + row)
        s = tl.where(dir_sq > 0, alpha / tl.sqrt(tl.maximum(dir_sq, flt_min)), 0.0)
        step_sq = tl.where(dir_sq > 0, alpha * alpha, 0.0)
        norm_sq = d_sq + 2.0 * s * cross + step_sq
        magnitude = d_sq + 2.0 * s * tl.abs(cross) + step_sq
        upper = tl.maximum(norm_sq, 0.0) + margin * magnitude
        t = tl.where(upper > 0, eps / tl.maximum(tl.sqrt(upper), 1e-30), 1.0)
        return s, tl.minimum(t, 1.0), eps

    @triton.jit
    def _update(t, a_ptr, c_ptr, row, n_tiles, eps, TILES: tl.constexpr):
        """The active-set update from the sums a pass wrote at t."""
        a_sum = _row_sum(a_ptr, row, n_tiles, TILES)
        c_sum = _row_sum(c_ptr, row, n_tiles, TILES)
        t_new = tl.sqrt(tl.maximum(eps * eps - c_sum, 0.0) / tl.maximum(a_sum, 1e-30))
        return tl.minimum(tl.maximum(t, t_new), 1.0)

    @triton.jit
    def _offsets(row, tile, n, BLOCK: tl.constexpr):
        """This program's values of its row: (offsets, in-row mask, the row's first value)."""
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < n, row.to(tl.int64) * n

    @triton.jit
    def _candidate(x, d, g, s):
        """v = δ + s·g, |v| and the room each pixel has in v's direction."""
        v = d + s * g
        return v, tl.abs(v), tl.maximum(tl.where(v >= 0, 1.0 - x, x), 0.0)

    @triton.jit
    def _pass(
        x_ptr, d_ptr, g_ptr, sums, alpha_ptr, eps_ptr, ts, parts, k, n, n_tiles, margin, flt_min,
        BLOCK: tl.constexpr, TILES: tl.constexpr,
    ):  # fmt: skip
        """The start of pass k in a program: t_k of its row (t₀ from the step's sums, t_k by the
        update from pass k − 1's sums), and its tile's x, δ, v = δ + s·g, |v| and room."""
        row = tl.program_id(0)
        tile = tl.program_id(1)
        n_rows = tl.num_programs(0)
        plane = n_rows * n_tiles
        s, t, eps = _scale(sums, row, n_tiles, alpha_ptr, eps_ptr, margin, flt_min, TILES)
        if k > 0:
            prev = parts + (k - 1) * 3 * plane
            t = _update(
                tl.load(ts + (k - 1) * n_rows + row), prev, prev + plane, row, n_tiles, eps, TILES
            )
        offs, mask, base = _offsets(row, tile, n, BLOCK)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
        d = tl.load(d_ptr + base + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v, a, cap = _candidate(x, d, g, s)
        return row, tile, offs, mask, base, x, d, v, a, cap, t, eps

    @triton.jit
    def sums_kernel(d_ptr, g_ptr, out, n, n_tiles, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        tile = tl.program_id(1)
        offs, mask, base = _offsets(row, tile, n, BLOCK)
        d = tl.load(d_ptr + base + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        slot = row * n_tiles + tile
        plane = tl.num_programs(0) * n_tiles
        tl.store(out + slot, tl.sum(d * d, 0))
        tl.store(out + plane + slot, tl.sum(d * g, 0))
        tl.store(out + 2 * plane + slot, tl.sum(g * g, 0))

    @triton.jit
    def update_kernel(
        x_ptr,
        d_ptr,
        g_ptr,
        sums,
        alpha_ptr,
        eps_ptr,
        ts,
        parts,
        k,
        n,
        n_tiles,
        margin,
        flt_min,
        BLOCK: tl.constexpr,
        TILES: tl.constexpr,
    ):
        """Pass k of the active-set iteration: t_k, then this tile's sums at t_k (k = 0 also the
        sum that says whether the clipped step fits whole)."""
        row, tile, _, _, _, _, _, _, a, cap, t, _ = _pass(
            x_ptr, d_ptr, g_ptr, sums, alpha_ptr, eps_ptr, ts, parts, k, n, n_tiles, margin,
            flt_min, BLOCK, TILES,
        )  # fmt: skip
        n_rows = tl.num_programs(0)
        plane = n_rows * n_tiles
        clipped = t * a > cap
        out = parts + k * 3 * plane + row * n_tiles + tile
        tl.store(out, tl.sum(tl.where(clipped, 0.0, a * a), 0))
        tl.store(out + plane, tl.sum(tl.where(clipped, cap * cap, 0.0), 0))
        if k == 0:
            m = tl.minimum(a, cap)
            tl.store(out + 2 * plane, tl.sum(m * m, 0))
        if tile == 0:
            tl.store(ts + k * n_rows + row, t)

    @triton.jit
    def output_kernel(
        x_ptr,
        d_ptr,
        g_ptr,
        sums,
        alpha_ptr,
        eps_ptr,
        ts,
        parts,
        k,
        val_ptr,
        sign_ptr,
        best_obj_ptr,
        best_val_ptr,
        best_d_ptr,
        new_d_ptr,
        z_ptr,
        new_obj_ptr,
        new_val_ptr,
        n,
        n_tiles,
        margin,
        flt_min,
        KEEP_BEST: tl.constexpr,
        BLOCK: tl.constexpr,
        TILES: tl.constexpr,
    ):
        """Pass k (the last): the projected step, x + step, and the scored iterate kept where it
        is the best."""
        row, tile, offs, mask, base, x, d, v, a, cap, t, eps = _pass(
            x_ptr, d_ptr, g_ptr, sums, alpha_ptr, eps_ptr, ts, parts, k, n, n_tiles, margin,
            flt_min, BLOCK, TILES,
        )  # fmt: skip
        plane = tl.num_programs(0) * n_tiles
        inside = _row_sum(parts + 2 * plane, row, n_tiles, TILES) <= eps * eps
        t = tl.where(inside, 1.0, t)
        m = tl.minimum(t * a, cap)
        new = tl.where(v < 0, -m, m)
        tl.store(new_d_ptr + base + offs, new, mask=mask)
        tl.store(z_ptr + base + offs, x + new, mask=mask)
        if KEEP_BEST:
            obj = tl.load(sign_ptr + row) * tl.load(val_ptr + row)
            best = tl.load(best_obj_ptr + row)
            better = obj > best
            if better:
                tl.store(best_d_ptr + base + offs, d, mask=mask)
            if tile == 0:
                tl.store(new_obj_ptr + row, tl.where(better, obj, best))
                tl.store(
                    new_val_ptr + row,
                    tl.where(better, tl.load(val_ptr + row), tl.load(best_val_ptr + row)),
                )

    _KERNELS: dict[str, Any] | None = {
        "sums": sums_kernel,
        "update": update_kernel,
        "output": output_kernel,
    }
else:
    _KERNELS = None


def available(t: Tensor) -> bool:
    """Whether :func:`pgd_step` runs for tensors like ``t`` (CUDA, Triton importable)."""
    return t.is_cuda and _KERNELS is not None


def triton_error() -> str | None:
    """Why Triton could not be imported (None if it was)."""
    return _error


def pgd_step(
    x: Tensor,
    delta: Tensor,
    grad: Tensor,
    val: Tensor,
    sign: Tensor,
    eps: Tensor,
    alpha: Tensor,
    best_obj: Tensor,
    best_val: Tensor,
    best_delta: Tensor,
    iterations: int,
    keep_best: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`itloop.stimulus.attacks._pgd_step` in 2 + ``iterations`` Triton kernels.

    x, delta: (B, C, H, W) fp32 contiguous; grad: the same shape, fp32 or bf16, in any layout (one
    other than x's is copied into x's first); val, sign, eps, alpha, best_obj, best_val: (B,)
    fp32. ``best_delta`` is updated in place (the rows whose ``sign · val`` beats ``best_obj``
    take ``delta``) and returned. Returns (new δ, x + new δ, best objective, best f, best δ).
    """
    kernels = _KERNELS
    if kernels is None:
        raise RuntimeError(f"the fused step needs Triton: {_error}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if grad.shape == x.shape and not grad.is_contiguous():
        # a model whose first layer is a plain channels_last convolution hands back its input
        # gradient channels_last; the kernels read every operand in x's order
        grad = grad.contiguous()
    for name, t, dtypes in (
        ("x", x, (torch.float32,)),
        ("delta", delta, (torch.float32,)),
        ("grad", grad, (torch.float32, torch.bfloat16)),
        ("best_delta", best_delta, (torch.float32,)),
    ):
        if t.shape != x.shape or not t.is_contiguous() or t.device != x.device:
            raise ValueError(
                f"{name} must be contiguous on {x.device} with shape {tuple(x.shape)}, got "
                f"{tuple(t.shape)} on {t.device}"
            )
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")
    rows = x.shape[0]
    n = x[0].numel()
    n_tiles = -(-n // BLOCK)
    tiles_p2 = 1 << max(n_tiles - 1, 0).bit_length()
    grid = (rows, n_tiles)
    sums = x.new_empty(3, rows, n_tiles)  # per tile: ‖δ‖², ⟨δ, g⟩, ‖g‖²
    parts = x.new_empty(iterations, 3, rows, n_tiles)  # per update and tile: A, C (and "inside")
    ts = x.new_empty(iterations, rows)  # t of each update, from each row's first tile
    new_d = torch.empty_like(delta)
    z = torch.empty_like(delta)
    new_obj = torch.empty_like(best_obj)
    new_val = torch.empty_like(best_val)
    kernels["sums"][grid](delta, grad, sums, n, n_tiles, BLOCK=BLOCK, num_warps=8)
    for k in range(iterations):
        kernels["update"][grid](
            x, delta, grad, sums, alpha, eps, ts, parts, k, n, n_tiles, _STEP_NORM_MARGIN,
            _FLT_MIN, BLOCK=BLOCK, TILES=tiles_p2, num_warps=8,
        )  # fmt: skip
    kernels["output"][grid](
        x, delta, grad, sums, alpha, eps, ts, parts, iterations, val, sign, best_obj, best_val,
        best_delta, new_d, z, new_obj, new_val, n, n_tiles, _STEP_NORM_MARGIN, _FLT_MIN,
        KEEP_BEST=keep_best, BLOCK=BLOCK, TILES=tiles_p2, num_warps=8,
    )  # fmt: skip
    if not keep_best:
        return new_d, z, best_obj, best_val, best_delta
    return new_d, z, new_obj, new_val, best_delta
