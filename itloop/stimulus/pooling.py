"""The ResNet stem's 3×3 max pool (stride 2, padding 1) with a backward that is one gather.

:func:`max_pool_3x3_s2` pools an ordinary (B, C, H, W) map. :func:`max_pool_3x3_s2_blocks` pools
the same map handed over in 2×2 blocks, (B, 4·C, H/2, W/2) with channel (u·2 + v)·C + c holding
pixel (2i + u, 2j + v) of channel c: the layout in which the split stem computes its output
(:class:`~itloop.stimulus.precision.SplitStem` with 2×2 output blocks). Pooling it there keeps the
gradient in that layout too, which the stem's data-gradient convolution reads; pooling the
unblocked map made the compiled backward write the pool's input gradient and then copy it into
blocks, one more pass over a full-resolution activation.

Both keep, per output, which of its 9 inputs won (int8), ties going to the first in scan order as
in PyTorch. An input at an even row/column is the centre of one window along that axis, one at an
odd position the last of one window and the first of the next, so each input's gradient is a sum
of at most 4 masked output gradients: a single pass that writes every input gradient once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaxPool3x3s2", "max_pool_3x3_s2", "max_pool_3x3_s2_blocks"]


def _best_of_windows(candidate: Any) -> tuple[Tensor, Tensor]:
    """(max, which) over the 9 window positions k = 3·kr + kc; ``candidate(kr, kc)`` gives the
    (B, Ho, Wo, C) inputs at that position. Strict comparison: ties go to the first."""
    best: Tensor = candidate(0, 0)
    code = torch.zeros(best.shape, dtype=torch.int8, device=best.device)
    for k in range(1, 9):
        cand = candidate(*divmod(k, 3))
        better = cand > best
        best = torch.where(better, cand, best)
        code = torch.where(better, torch.full_like(code, k), code)
    return best, code


def _gradient_by_phase(code: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The input gradient at the (even, even), (even, odd), (odd, even) and (odd, odd) pixels,
    each (B, Ho, Wo, C), from the winners ``code`` and the output gradient ``grad`` (B, Ho, Wo,
    C): pixel (2i + u, 2j + v) is window row kr = 1 + u of window i and, when u = 1, kr = 0 of
    window i + 1 (columns alike)."""
    ho, wo = code.shape[1:3]
    g = F.pad(grad, (0, 0, 0, 1, 0, 1))
    cp = F.pad(code, (0, 0, 0, 1, 0, 1), value=-1)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)

    def part(kr: int, kc: int, dr: int, dc: int) -> Tensor:
        gs = g[:, dr : dr + ho, dc : dc + wo]
        cs = cp[:, dr : dr + ho, dc : dc + wo]
        return torch.where(cs == 3 * kr + kc, gs, zero)

    ee = part(1, 1, 0, 0)
    eo = part(1, 2, 0, 0) + part(1, 0, 0, 1)
    oe = part(2, 1, 0, 0) + part(0, 1, 1, 0)
    oo = part(2, 2, 0, 0) + part(2, 0, 0, 1) + part(0, 2, 1, 0) + part(0, 0, 1, 1)
    return ee, eo, oe, oo


class _MaxPool3x3s2(torch.autograd.Function):
    """3×3 max pool, stride 2, padding 1, of a (B, C, H, W) map."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        _b, _c, h, w = y.shape
        ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        yp = F.pad(y.permute(0, 2, 3, 1), (0, 0, 1, 2 * wo - w, 1, 2 * ho - h), value=-torch.inf)
        best, code = _best_of_windows(
            lambda kr, kc: yp[:, kr : kr + 2 * ho : 2, kc : kc + 2 * wo : 2]
        )
        ctx.save_for_backward(code)
        ctx.hw = (h, w)
        return best.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (code,) = ctx.saved_tensors
        h, w = ctx.hw
        b, ho, wo, c = code.shape
        ee, eo, oe, oo = _gradient_by_phase(code, grad.permute(0, 2, 3, 1))
        rows = torch.stack([torch.stack([ee, eo], dim=3), torch.stack([oe, oo], dim=3)], dim=2)
        full = rows.reshape(b, 2 * ho, 2 * wo, c)[:, :h, :w]
        return full.permute(0, 3, 1, 2)


class _MaxPool3x3s2Blocks(torch.autograd.Function):
    """The same pool of a (2·Hb, 2·Wb) map given as its (B, 4·C, Hb, Wb) 2×2 blocks."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        b, c4, hb, wb = y.shape
        # (B, Hb + 1, Wb + 1, 2, 2, C): a row (column) of -inf blocks before the first
        yb = F.pad(
            y.permute(0, 2, 3, 1).reshape(b, hb, wb, 2, 2, c4 // 4),
            (0, 0, 0, 0, 0, 0, 1, 0, 1, 0),
            value=-torch.inf,
        )
        # window row kr of output row i: pixel 2i - 1 (block i - 1, phase 1), 2i, 2i + 1
        at = ((0, 1), (1, 0), (1, 1))
        best, code = _best_of_windows(
            lambda kr, kc: yb[:, at[kr][0] : at[kr][0] + hb, at[kc][0] : at[kc][0] + wb][
                :, :, :, at[kr][1], at[kc][1]
            ]
        )
        ctx.save_for_backward(code)
        return best.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (code,) = ctx.saved_tensors
        b, hb, wb, c = code.shape
        ee, eo, oe, oo = _gradient_by_phase(code, grad.permute(0, 2, 3, 1))
        blocks = torch.stack([ee, eo, oe, oo], dim=3).reshape(b, hb, wb, 4 * c)
        return blocks.permute(0, 3, 1, 2)


def max_pool_3x3_s2(y: Tensor) -> Tensor:
    """``F.max_pool2d(y, 3, 2, 1)`` of (B, C, H, W) ``y`` with a single-pass backward."""
    out: Tensor = _MaxPool3x3s2.apply(y)
    return out


def max_pool_3x3_s2_blocks(y: Tensor) -> Tensor:
    """``F.max_pool2d(m, 3, 2, 1)`` of the (B, C, 2·Hb, 2·Wb) map ``m`` given as its 2×2 blocks
    ``y`` (B, 4·C, Hb, Wb), channel (u·2 + v)·C + c holding m[:, c, 2i + u, 2j + v]; returns
    (B, C, Hb, Wb), and its backward the gradient in ``y``'s block layout."""
    if y.ndim != 4 or y.shape[1] % 4:
        raise ValueError(f"2×2 blocks are (B, 4·C, Hb, Wb), got {tuple(y.shape)}")
    out: Tensor = _MaxPool3x3s2Blocks.apply(y)
    return out


class MaxPool3x3s2(nn.Module):
    """``nn.MaxPool2d(3, 2, 1)`` computed by :func:`max_pool_3x3_s2`."""

    def forward(self, y: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉)."""
        return max_pool_3x3_s2(y)
