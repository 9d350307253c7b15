"""Convolution, bias, residual and ReLU as one cuDNN kernel in the attack loop's network.

After BatchNorm folding a ResNet is a chain of ``relu(conv(x) + b)`` and ``relu(conv(x) + b + z)``
(the residual). Run as separate kernels, each of these writes the convolution's output, reads it
back, and writes the activation again: for ResNet-50 cut at ``layer4.0`` about 10 M activations per
image, so at batch 512 some 20 GB of memory traffic per forward pass that does no arithmetic. cuDNN
fuses the epilogue into the convolution (``cudnn_convolution_relu``,
``cudnn_convolution_add_relu``), so each activation is written once.

:func:`conv_bias_relu` is that fused operation as a PyTorch custom op with its own backward: the
attack needs only input gradients, so the backward is the ReLU mask applied to the incoming
gradient (from the saved output, nothing else kept) and one data-gradient convolution; weight and
bias gradients are computed only when asked for. On the CPU, or for a dtype cuDNN's fused kernels
do not take, the op is the plain composition, so the same rewritten model runs everywhere.

:func:`fuse_conv_relu` rewrites a model with ``torch.fx``: every ``Conv2d`` whose only use is a
ReLU (directly, through ``Identity`` left by folding, or through one addition of another tensor)
becomes one :class:`FusedConvReLU` call. Modules that fx cannot trace are searched child by child;
the first convolution stays as it is when it is a :class:`~itloop.stimulus.precision.SplitStem`.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from itloop.stimulus.pooling import MaxPool3x3s2
from itloop.stimulus.precision import (
    Fp32Input,
    SplitStem,
    check_same_function,
    conv_output_hw,
    memory_layout,
    op_dtype,
    replace_submodule,
)

__all__ = [
    "Conv1x1Matmul",
    "FusedConvReLU",
    "conv_bias_relu",
    "count_fused",
    "cudnn_fusable",
    "fuse_conv_relu",
]

_FUSED_DTYPES = (torch.float16, torch.bfloat16)


def cudnn_fusable(x: Tensor, weight: Tensor) -> bool:
    """Whether cuDNN's fused convolution kernels take these operands (CUDA, half or bf16, 4-D)."""
    return (
        x.is_cuda
        and x.ndim == 4
        and x.dtype in _FUSED_DTYPES
        and weight.dtype == x.dtype
        and bool(torch.backends.cudnn.is_available())  # type: ignore[no-untyped-call]
        and torch.backends.cudnn.enabled
    )


@torch.library.custom_op("itloop::conv_bias_relu", mutates_args=())
def conv_bias_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mm_dgrad: bool = False,
) -> Tensor:
    """relu(conv2d(x, weight) + bias [+ residual]) in one cuDNN kernel where cuDNN fuses it.

    x: (B, C, H, W); weight: (O, C/groups, kh, kw); bias: (O,); residual: None or (B, O, Ho, Wo);
    all of one dtype. Returns (B, O, Ho, Wo) in x's dtype and layout (channels_last stays).
    mm_dgrad: for a 1×1, stride-1, unpadded, ungrouped conv, the backward's input gradient is a
    matmul over channels (which a compiler can fuse the ReLU masks around) instead of a
    data-gradient convolution; the same numbers either way.
    """
    return _conv_bias_relu_impl(x, weight, bias, residual, stride, padding, dilation, groups)


def _conv_bias_relu_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """The forward of :func:`conv_bias_relu`: one cuDNN kernel where cuDNN fuses it."""
    st, pad, dil = list(stride), list(padding), list(dilation)
    fmt = memory_layout(x)
    if cudnn_fusable(x, weight):
        if residual is None:
            y = torch.cudnn_convolution_relu(x, weight, bias, st, pad, dil, groups)
        else:
            y = torch.cudnn_convolution_add_relu(
                x, weight, residual, 1.0, bias, st, pad, dil, groups
            )
    else:
        y = F.conv2d(x, weight, bias, st, pad, dil, groups)
        if residual is not None:
            y = y + residual
        y = torch.relu(y)
    return y.contiguous(memory_format=fmt)


@conv_bias_relu.register_fake
def _conv_bias_relu_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    mm_dgrad: bool = False,
) -> Tensor:
    ho, wo = conv_output_hw(x, weight, stride, padding, dilation)
    return torch.empty(
        (x.shape[0], weight.shape[0], ho, wo),
        dtype=x.dtype,
        device=x.device,
        memory_format=memory_layout(x),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, _bias, residual, stride, padding, dilation, groups, mm_dgrad = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conv = (list(stride), list(padding), list(dilation), int(groups))
    ctx.mm_dgrad = bool(mm_dgrad) and _is_pointwise_conv(weight, stride, padding, groups)
    ctx.has_residual = residual is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
    g = torch.where(y > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    g = g.contiguous(memory_format=memory_layout(y))  # the layout the data gradient reads
    gx = gw = gb = None
    if ctx.mm_dgrad and need_x and not (need_w or need_b):
        # (B, O, H, W) -> (B, H, W, O) @ (O, C) -> (B, H, W, C): one GEMM over channels_last rows
        gx = torch.matmul(g.permute(0, 2, 3, 1), weight.flatten(1)).permute(0, 3, 1, 2)
    elif need_x or need_w or need_b:
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g,
            x,
            weight,
            [weight.shape[0]] if need_b else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [bool(need_x), bool(need_w), bool(need_b)],
        )
    gz = g if ctx.has_residual and need_z else None
    return gx, gw, gb, gz, None, None, None, None, None


def _is_pointwise_conv(
    weight: Tensor, stride: Sequence[int], padding: Sequence[int], groups: int
) -> bool:
    """A 1×1, stride-1, unpadded, ungrouped convolution: a matmul over channels."""
    return (
        tuple(weight.shape[2:]) == (1, 1)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (0, 0)
        and groups == 1
    )


conv_bias_relu.register_autograd(_backward, setup_context=_setup_context)


def weight_and_bias(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A convolution's weight and bias (zeros where it has none) in ``dtype``."""
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    return conv.weight.to(dtype), bias.to(dtype)


class FusedConvReLU(nn.Module):
    """``relu(conv(x) [+ residual])`` of a Conv2d, as one :func:`conv_bias_relu` call.

    Under autocast every operand is cast to autocast's dtype (the custom op is not autocast-aware);
    otherwise weight, bias and residual take x's dtype. mm_dgrad: see :func:`conv_bias_relu`.
    """

    def __init__(self, conv: nn.Conv2d, *, mm_dgrad: bool = False) -> None:
        super().__init__()
        self.mm_dgrad = mm_dgrad
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"FusedConvReLU needs numeric zero padding, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        self.conv = conv

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """(B, C, H, W) input [+ (B, O, Ho, Wo) residual] -> (B, O, Ho, Wo) activation."""
        conv = self.conv
        dtype = op_dtype(x)
        weight, bias = weight_and_bias(conv, dtype)
        padding = conv.padding
        assert not isinstance(padding, str)  # refused in __init__
        out: Tensor = conv_bias_relu(
            x.to(dtype),
            weight,
            bias,
            None if residual is None else residual.to(dtype),
            [int(s) for s in conv.stride],
            [int(p) for p in padding],
            [int(d) for d in conv.dilation],
            int(conv.groups),
            self.mm_dgrad,
        )
        return out


class Conv1x1Matmul(nn.Module):
    """A 1×1 Conv2d (any stride), optionally followed by ``+ residual`` and ReLU, as a matmul over
    the channels of a channels_last tensor.

    Written this way the compiler sees a GEMM with a pointwise epilogue and, with Triton GEMM
    templates, fuses bias, residual and ReLU into it, and in the backward the next layer's ReLU
    mask into the data-gradient GEMM; cuDNN's own fusion stops at the forward pass.
    """

    def __init__(self, conv: nn.Conv2d, *, relu: bool) -> None:
        super().__init__()
        if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1 or tuple(conv.padding) != (0, 0):
            raise ValueError(f"Conv1x1Matmul needs a 1×1, ungrouped, unpadded Conv2d, got {conv}")
        self.conv = conv
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """(B, C, H, W) input [+ (B, O, Ho, Wo) residual] -> (B, O, Ho, Wo)."""
        sh, sw = (int(s) for s in self.conv.stride)
        if (sh, sw) != (1, 1):
            x = x[:, :, ::sh, ::sw]
        w = self.conv.weight.flatten(1)
        y = F.linear(x.permute(0, 2, 3, 1), w, self.conv.bias).permute(0, 3, 1, 2)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


def _is_resnet_pool(m: nn.Module) -> bool:
    def pair(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    return (
        type(m) is nn.MaxPool2d
        and pair(m.kernel_size) == (3, 3)
        and pair(m.stride) == (2, 2)
        and pair(m.padding) == (1, 1)
        and pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


_LEAVES = (SplitStem, Fp32Input, FusedConvReLU, Conv1x1Matmul, MaxPool3x3s2)
_RELU_FUNCTIONS: tuple[Callable[..., Any], ...] = (F.relu, torch.relu)
_ADD_FUNCTIONS: tuple[Callable[..., Any], ...] = (operator.add, operator.iadd, torch.add)


def _is_leaf(m: nn.Module) -> bool:
    from itloop.stimulus.blocks import FusedBottleneck  # blocks builds on this module

    return isinstance(m, (*_LEAVES, FusedBottleneck))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _through_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Step back through single-use Identity modules (what BatchNorm folding leaves)."""
    while (
        node.op == "call_module"
        and isinstance(_module(gm, node), nn.Identity)
        and isinstance(node.args[0], fx.Node)
        and len(node.users) == 1
    ):
        node = node.args[0]
    return node


def _fusable_conv(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The conv call feeding ``node`` (through Identity) when its output is used only there."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    conv_node = _through_identity(gm, node)
    conv = _module(gm, conv_node)
    if (
        type(conv) is nn.Conv2d
        and len(conv_node.users) == 1
        and len(conv_node.args) == 1
        and isinstance(conv_node.args[0], fx.Node)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    ):
        return conv_node
    return None


def _is_1x1(conv: nn.Conv2d) -> bool:
    return tuple(conv.kernel_size) == (1, 1) and conv.groups == 1 and tuple(conv.padding) == (0, 0)


def _fuse_graph(gm: fx.GraphModule, *, matmul_1x1: bool, mm_dgrad: bool, max_pool: bool) -> int:
    """Rewrite conv(→Identity)→(+ z)→relu patterns (and, as asked, 1×1 convs and 3×3/2 max pools)
    in place; returns how many modules were replaced."""
    fused = 0
    for relu in list(gm.graph.nodes):
        if not _is_relu(gm, relu) or not isinstance(relu.args[0], fx.Node):
            continue
        src = relu.args[0]
        residual: fx.Node | None = None
        conv_node = _fusable_conv(gm, src)
        if conv_node is None and src.op in ("call_function", "call_method") and len(src.users) == 1:
            is_add = (src.op == "call_function" and src.target in _ADD_FUNCTIONS) or (
                src.op == "call_method" and src.target in ("add", "add_")
            )
            if is_add and len(src.args) == 2 and not src.kwargs:
                a, b = src.args
                for mine, other in ((a, b), (b, a)):
                    hit = _fusable_conv(gm, mine)
                    if hit is not None and isinstance(other, fx.Node):
                        conv_node, residual = hit, other
                        break
        if conv_node is None:
            continue
        conv = _module(gm, conv_node)
        assert isinstance(conv, nn.Conv2d)
        name = f"{str(conv_node.target).replace('.', '_')}_fused_relu"
        module: nn.Module = (
            Conv1x1Matmul(conv, relu=True)
            if matmul_1x1 and _is_1x1(conv)
            else FusedConvReLU(conv, mm_dgrad=mm_dgrad)
        )
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(relu):
            args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
            new = gm.graph.call_module(name, args)
        relu.replace_all_uses_with(new)
        fused += 1
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if matmul_1x1 and type(mod) is nn.Conv2d and _is_1x1(mod):
            replace_submodule(gm, str(node.target), Conv1x1Matmul(mod, relu=False))
            fused += 1
        elif max_pool and mod is not None and _is_resnet_pool(mod):
            replace_submodule(gm, str(node.target), MaxPool3x3s2())
            _pool_before_relu(gm, node)
            _pool_into_stem(gm, node)
            fused += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return fused


def _pool_before_relu(gm: fx.GraphModule, pool: fx.Node) -> None:
    """maxpool(relu(y)) -> relu(maxpool(y)) where the ReLU feeds only the pool.

    The same values (max is monotone), and the same gradient: a window whose maximum is positive
    picks the same input either way, one whose maximum is not has a zero gradient either way. The
    pool then keeps no full-resolution activation for the ReLU's backward: its mask is the pooled
    output's, a quarter of the size.
    """
    relu = pool.args[0]
    if not (
        isinstance(relu, fx.Node)
        and _is_relu(gm, relu)
        and len(relu.users) == 1
        and isinstance(relu.args[0], fx.Node)
    ):
        return
    pool.args = (relu.args[0], *pool.args[1:])
    with gm.graph.inserting_after(pool):
        after = gm.graph.call_function(torch.relu, (pool,))
    pool.replace_all_uses_with(after, delete_user_cb=lambda user: user is not after)
    gm.graph.erase_node(relu)


def _pool_into_stem(gm: fx.GraphModule, pool: fx.Node) -> None:
    """split stem → (Identity) → pool, each the only consumer of the one before: the stem pools.

    A :class:`~itloop.stimulus.precision.SplitStem` that pools its own output can do so in the
    2×2 blocks it computes, so its gradient never changes layout (``SplitStem.max_pool``).
    """
    source = pool.args[0]
    if not isinstance(source, fx.Node) or len(source.users) != 1:
        return
    stem_node = _through_identity(gm, source)
    stem = _module(gm, stem_node)
    if not isinstance(stem, SplitStem) or len(stem_node.users) != 1 or stem.max_pool:
        return
    stem.max_pool = True
    pool.replace_all_uses_with(source)
    gm.graph.erase_node(pool)


def _fuse_module(module: nn.Module, **options: bool) -> tuple[nn.Module, int]:
    """(module with its conv-ReLU patterns fused, how many); untraceable modules by children."""
    if _is_leaf(module):
        return module, 0
    try:
        graph = _Tracer().trace(module)
    except Exception:  # fx cannot trace data-dependent Python (shape checks): go one level down
        total = 0
        for name, child in list(module.named_children()):
            new, n = _fuse_module(child, **options)
            if n:
                setattr(module, name, new)
            total += n
        return module, total
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    n = _fuse_graph(gm, **options)
    return (gm, n) if n else (module, 0)


def fuse_conv_relu(
    model: nn.Module,
    example: Tensor,
    *,
    matmul_1x1: bool = False,
    mm_dgrad: bool = False,
    max_pool: bool = True,
    blocks: bool = False,
    rtol: float = 1e-4,
) -> nn.Module:
    """A copy of eval-mode ``model`` in which each Conv2d → ReLU (and Conv2d → + z → ReLU) is one
    :class:`FusedConvReLU`.

    matmul_1x1: 1×1 convolutions become :class:`Conv1x1Matmul` instead (with their ReLU and
    residual where they have one), for a compiler that fuses GEMM epilogues. mm_dgrad: the fused
    1×1 stride-1 convolutions keep cuDNN's forward but take their input gradient as a matmul
    (:func:`conv_bias_relu`), so the compiler can fuse the backward's ReLU masks and residual
    sums into that GEMM. max_pool: 3×3/2 max pools (the ResNet stem's) become
    :class:`~itloop.stimulus.pooling.MaxPool3x3s2`, or, where a split stem's output has no other
    consumer, part of the stem (``SplitStem.max_pool``), which pools its output blocks. blocks:
    BatchNorm-folded ResNet bottlenecks become :class:`~itloop.stimulus.blocks.FusedBottleneck`
    (one op each, whose backward fuses ReLU masks and residual sums into cuDNN data-gradient
    convolutions). example: (B, C, H, W) input on the
    model's device; the copy must compute the same function on it in fp32 (relative error ≤ rtol,
    else ValueError). Returns the copy even when nothing was replaced.
    """
    if model.training:
        raise ValueError(f"fuse_conv_relu needs an eval-mode model; {type(model).__name__} is not")
    fused = copy.deepcopy(model)
    if blocks:
        from itloop.stimulus.blocks import fuse_bottlenecks

        fuse_bottlenecks(fused)
    fused, _ = _fuse_module(fused, matmul_1x1=matmul_1x1, mm_dgrad=mm_dgrad, max_pool=max_pool)
    check_same_function(model, fused, example, rtol=rtol, what="fusing conv and ReLU")
    return fused


def count_fused(model: nn.Module) -> int:
    """How many fused convolutions (FusedConvReLU, Conv1x1Matmul) ``model`` holds."""
    return sum(isinstance(m, (FusedConvReLU, Conv1x1Matmul)) for m in model.modules())
