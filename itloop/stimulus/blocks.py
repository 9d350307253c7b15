"""ResNet bottleneck blocks as one op whose backward runs as three fused data-gradient convolutions.

A BatchNorm-folded bottleneck is ``relu(c3(relu(c2(relu(c1(x))))) + d(x))``, with ``d`` the identity
or a 1×1 convolution. Its input gradient, written as autograd composes it, is three data-gradient
convolutions with pointwise passes between them: the ReLU masks of ``c2``'s and ``c3``'s inputs, the
sum of the two paths into ``x`` and, in the block before, the mask of its output. Every such pass
reads and writes a full activation gradient; in ResNet-50 up to ``layer4.0`` they cost as much time
as the convolutions. :func:`bottleneck` is the block as one PyTorch custom op whose backward folds
each mask and the sum into the epilogue of a data-gradient convolution
(:func:`itloop.stimulus.cudnn_graphs.dgrad_epilogue`):

    g   = dL/d(out)                      (already masked by out > 0: see below)
    g2  = relu_backward(dgrad(g, w3), a2)
    g1  = relu_backward(dgrad(g2, w2), a1)
    gx  = relu_backward(dgrad(g1, w1) + (g or dgrad(g, wd)), x)

The last line masks the block's input gradient by ``x > 0``. That is the mask of the ReLU that
produced ``x`` (the previous block's output): applying it to this consumer's contribution changes
nothing when ``x`` is a ReLU output, since the ReLU's own backward applies the same mask to the sum
of its consumers' contributions and masking twice is masking once. When the previous block's output
has no consumer but this block, its backward can then skip its own mask (``grad_premasked``).
:func:`link_bottlenecks` sets both flags on consecutive blocks of an ``nn.Sequential`` and nowhere
else, so the gradient with respect to the network's input is exactly autograd's.

Only input gradients are computed (the attack needs no others): :class:`FusedBottleneck` refuses
parameters that require gradients. On the CPU, or where cuDNN's graph API is absent, the same
backward runs as the plain composition.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itloop.stimulus import cudnn_graphs
from itloop.stimulus.fusion import _conv_bias_relu_impl, weight_and_bias
from itloop.stimulus.precision import conv_data_grad, conv_output_hw, memory_layout, op_dtype

__all__ = [
    "FusedBottleneck",
    "bottleneck",
    "conv_input_grad",
    "count_blocks",
    "fuse_bottlenecks",
    "link_bottlenecks",
]

_ONE = [1, 1]
_ZERO = [0, 0]


def _composed_input_grad(
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu_mask: bool,
) -> Tensor:
    gx = conv_data_grad(grad, x, weight, stride, padding, dilation, groups)
    if residual is not None:
        gx = gx + residual
    if relu_mask:
        gx = torch.where(x > 0, gx, torch.zeros((), dtype=gx.dtype, device=gx.device))
    return gx


@torch.library.custom_op("itloop::dgrad_epilogue", mutates_args=())
def dgrad_epilogue(
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu_mask: bool,
) -> Tensor:
    """One cuDNN kernel for :func:`conv_input_grad` (ungrouped, CUDA fp16/bf16), channels_last."""
    out = cudnn_graphs.dgrad_epilogue(
        grad, weight, x, residual, stride, padding, dilation, relu_mask
    )
    if out is None:  # no cuDNN plan for this geometry
        out = _composed_input_grad(
            grad, weight, x, residual, stride, padding, dilation, 1, relu_mask
        )
    return out.contiguous(memory_format=torch.channels_last)


@dgrad_epilogue.register_fake
def _dgrad_epilogue_fake(
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu_mask: bool,
) -> Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def conv_input_grad(
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu_mask: bool,
) -> Tensor:
    """``(dgrad(grad, weight) [+ residual]) * (x > 0 if relu_mask)``: the input gradient of
    ``conv2d(x, weight)`` for the output gradient ``grad``, plus ``residual``, ReLU-masked by x.

    One cuDNN kernel where :func:`itloop.stimulus.cudnn_graphs.available` (CUDA fp16/bf16, cuDNN's
    graph API installed) and there is an epilogue to fuse; otherwise the composition.
    """
    if groups == 1 and (relu_mask or residual is not None) and cudnn_graphs.available(grad):
        out: Tensor = torch.ops.itloop.dgrad_epilogue(
            grad, weight, x, residual, list(stride), list(padding), list(dilation), relu_mask
        )
        return out
    return _composed_input_grad(
        grad, weight, x, residual, stride, padding, dilation, groups, relu_mask
    )


@torch.library.custom_op("itloop::bottleneck", mutates_args=())
def bottleneck(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    wd: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    stride_d: list[int],
    relu_mask_input: bool,
    grad_premasked: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """A folded bottleneck: ``relu(c3(relu(c2(relu(c1(x))))) + d(x))``; returns (out, a1, a2).

    c1, c3: 1×1 stride-1 convolutions (w1, b1; w3, b3); c2: w2, b2 with stride, padding, dilation,
    groups; d: identity (wd None) or the bias-free 1×1 convolution wd with stride_d (its bias
    belongs in b3, which the fused epilogue adds). a1, a2 are the inner
    activations, returned for the backward (not differentiable). relu_mask_input: the input gradient
    is masked by x > 0 (x is a ReLU output). grad_premasked: the incoming gradient is already masked
    by out > 0 (its only consumer masked it). Forward convolutions fuse bias, residual and ReLU in
    cuDNN where cuDNN does.
    """
    a1 = _conv_bias_relu_impl(x, w1, b1, None, _ONE, _ZERO, _ONE, 1)
    a2 = _conv_bias_relu_impl(a1, w2, b2, None, stride, padding, dilation, groups)
    identity = x if wd is None else F.conv2d(x, wd, None, stride_d)
    out = _conv_bias_relu_impl(a2, w3, b3, identity, _ONE, _ZERO, _ONE, 1)
    return out, a1, a2


@bottleneck.register_fake
def _bottleneck_fake(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    wd: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    stride_d: list[int],
    relu_mask_input: bool,
    grad_premasked: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    b, _, h, w = x.shape
    fmt = memory_layout(x)
    ho, wo = conv_output_hw(x, w2, stride, padding, dilation)

    def new(c: int, hh: int, ww: int) -> Tensor:
        return torch.empty((b, c, hh, ww), dtype=x.dtype, device=x.device, memory_format=fmt)

    return new(int(w3.shape[0]), ho, wo), new(int(w1.shape[0]), h, w), new(int(w2.shape[0]), ho, wo)


def _bottleneck_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, w1, _b1, w2, _b2, w3, _b3, wd = inputs[:8]
    stride, padding, dilation, groups, stride_d, relu_mask_input, grad_premasked = inputs[8:]
    out, a1, a2 = output
    ctx.save_for_backward(x, w1, w2, w3, wd, a1, a2, out)
    ctx.conv2 = (list(stride), list(padding), list(dilation), int(groups))
    ctx.stride_d = list(stride_d)
    ctx.relu_mask_input = bool(relu_mask_input)
    ctx.grad_premasked = bool(grad_premasked)


def _bottleneck_backward(
    ctx: Any, grad: Tensor, _grad_a1: Tensor | None, _grad_a2: Tensor | None
) -> tuple[Tensor | None, ...]:
    x, w1, w2, w3, wd, a1, a2, out = ctx.saved_tensors
    if any(ctx.needs_input_grad[1:8]):
        raise RuntimeError("bottleneck computes input gradients only; its weights must be frozen")
    stride, padding, dilation, groups = ctx.conv2
    g = grad
    if not ctx.grad_premasked:
        g = torch.where(out > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
    # in the block's layout: a gradient from a readout often arrives NCHW, and a transposing copy
    # inside each convolution that reads it is far slower than writing it so here
    g = g.contiguous(memory_format=memory_layout(out))
    g2 = conv_input_grad(g, w3, a2, None, _ONE, _ZERO, _ONE, 1, True)
    g1 = conv_input_grad(g2, w2, a1, None, stride, padding, dilation, groups, True)
    path = g if wd is None else conv_data_grad(g, x, wd, ctx.stride_d, _ZERO, _ONE, 1)
    gx = conv_input_grad(g1, w1, x, path, _ONE, _ZERO, _ONE, 1, ctx.relu_mask_input)
    return (gx,) + (None,) * 14


bottleneck.register_autograd(_bottleneck_backward, setup_context=_bottleneck_setup)


def _is_1x1(conv: Any, *, any_stride: bool = False) -> bool:
    return (
        type(conv) is nn.Conv2d
        and tuple(conv.kernel_size) == (1, 1)
        and (any_stride or tuple(conv.stride) == (1, 1))
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )


def _why_not_bottleneck(m: nn.Module) -> str | None:
    """None when ``m`` is a BatchNorm-folded torchvision-style Bottleneck, else the reason."""
    if type(m).__name__ != "Bottleneck":
        return f"{type(m).__name__} is not a Bottleneck"
    parts = ("conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "relu", "downsample")
    missing = [p for p in parts if not hasattr(m, p)]
    if missing:
        return f"Bottleneck without {missing}"
    if not all(isinstance(getattr(m, f"bn{i}"), nn.Identity) for i in (1, 2, 3)):
        return "its BatchNorms are not folded"
    if not isinstance(m.relu, nn.ReLU):
        return f"its activation is {type(m.relu).__name__}, not ReLU"
    c2 = m.conv2
    if not (_is_1x1(m.conv1) and _is_1x1(m.conv3)):
        return "conv1 and conv3 are not 1×1, stride-1, ungrouped"
    if type(c2) is not nn.Conv2d or c2.padding_mode != "zeros" or isinstance(c2.padding, str):
        return "conv2 is not a zero-padded Conv2d with numeric padding"
    ds = m.downsample
    if ds is not None and not (
        isinstance(ds, nn.Sequential)
        and len(ds) == 2
        and _is_1x1(ds[0], any_stride=True)
        and isinstance(ds[1], nn.Identity)
    ):
        return "its downsample is not a folded 1×1 convolution"
    if m._forward_hooks or m._forward_pre_hooks:
        return "it has forward hooks"
    return None


class FusedBottleneck(nn.Module):
    """A BatchNorm-folded torchvision Bottleneck run as one :func:`bottleneck` op.

    relu_mask_input and grad_premasked start False (autograd's exact gradient); only
    :func:`link_bottlenecks` sets them, on blocks that feed each other and nothing else.
    Under autocast every operand is cast to autocast's dtype. Parameters must be frozen.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        why = _why_not_bottleneck(block)
        if why is not None:
            raise ValueError(f"FusedBottleneck needs a folded Bottleneck: {why}")
        self.conv1: nn.Conv2d = block.conv1  # type: ignore[assignment]
        self.conv2: nn.Conv2d = block.conv2  # type: ignore[assignment]
        self.conv3: nn.Conv2d = block.conv3  # type: ignore[assignment]
        ds = block.downsample
        self.downsample: nn.Conv2d | None = None
        if isinstance(ds, nn.Sequential) and isinstance(ds[0], nn.Conv2d):
            self.downsample = ds[0]
        self.relu_mask_input = False
        self.grad_premasked = False

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, O, Ho, Wo), the block's output."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(
                "FusedBottleneck computes input gradients only; its parameters require gradients"
            )
        dtype = op_dtype(x)
        (w1, b1), (w2, b2), (w3, b3) = (
            weight_and_bias(c, dtype) for c in (self.conv1, self.conv2, self.conv3)
        )
        wd = None
        stride_d = [1, 1]
        if self.downsample is not None:  # its bias joins c3's: one addition, in c3's epilogue
            wd, bd = weight_and_bias(self.downsample, dtype)
            b3 = b3 + bd
            stride_d = [int(s) for s in self.downsample.stride]
        c2 = self.conv2
        padding = c2.padding
        assert not isinstance(padding, str)  # refused in __init__
        out: Tensor
        out, _a1, _a2 = bottleneck(
            x.to(dtype),
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            wd,
            [int(s) for s in c2.stride],
            [int(p) for p in padding],
            [int(d) for d in c2.dilation],
            int(c2.groups),
            stride_d,
            self.relu_mask_input,
            self.grad_premasked,
        )
        return out


def fuse_bottlenecks(model: nn.Module) -> int:
    """Replace, in place, every folded torchvision Bottleneck of ``model`` by a FusedBottleneck,
    then :func:`link_bottlenecks`; returns how many blocks were replaced."""
    count = _replace_bottlenecks(model)
    if count:
        link_bottlenecks(model)
    return count


def _replace_bottlenecks(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if _why_not_bottleneck(child) is None:
            setattr(module, name, FusedBottleneck(child))
            count += 1
        else:
            count += _replace_bottlenecks(child)
    return count


def _flat(seq: nn.Sequential) -> Iterator[nn.Module]:
    for child in seq:
        if type(child) is nn.Sequential and not (child._forward_hooks or child._forward_pre_hooks):
            yield from _flat(child)
        else:
            yield child


def link_bottlenecks(model: nn.Module) -> int:
    """Mark FusedBottlenecks that directly follow one another in a plain ``nn.Sequential`` (nested
    Sequentials flattened): the first's output then has no consumer but the second, which masks
    its input gradient, so the first skips its own mask. Returns the number of links."""
    links = 0
    for seq in model.modules():
        if type(seq) is not nn.Sequential or seq._forward_hooks or seq._forward_pre_hooks:
            continue
        order = list(_flat(seq))
        for a, b in itertools.pairwise(order):
            if isinstance(a, FusedBottleneck) and isinstance(b, FusedBottleneck):
                if not (a.grad_premasked and b.relu_mask_input):
                    links += 1
                a.grad_premasked = b.relu_mask_input = True
    return links


def count_blocks(model: nn.Module) -> int:
    """How many FusedBottlenecks ``model`` holds."""
    return sum(isinstance(m, FusedBottleneck) for m in model.modules())
