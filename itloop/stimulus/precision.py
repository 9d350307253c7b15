"""Numerics that keep a small perturbation intact: a split first layer, an fp32 one, exact fp32.

Casting ``x + δ`` to bf16 (8 significant bits) erases about a quarter of an ε = 1 perturbation: its
per-pixel change (~0.003) is below half a bf16 step for most pixel values. So the image, δ and the
projection stay fp32, and the first convolution runs with autocast off on its fp32 input; only its
output enters the bf16 part of the network. cuDNN may still run that fp32 convolution in TF32 (11
significant bits; PyTorch's default for convolutions) inside the attack loop; the predictions that
are stored with a stimulus are computed under :func:`exact_fp32`.

:class:`SplitStem` is what the attack loop uses under autocast. The first convolution is linear, so
``conv(x + δ) = conv(x) + conv(δ)``: the clean term is computed once per batch in exact fp32 and the
perturbation term on δ itself, in the autocast dtype. Rounding δ (not x + δ) to bf16 changes it by
at most 2⁻⁹ of its own size, so nothing of the perturbation is erased, and the convolution runs on
tensor cores (its input channels zero-padded to a multiple of 8), where an fp32 convolution with
three input channels falls back to slow kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itloop.stimulus.pooling import max_pool_3x3_s2, max_pool_3x3_s2_blocks

__all__ = [
    "Fp32Input",
    "SplitStem",
    "check_same_function",
    "conv_data_grad",
    "conv_fp32_precision",
    "conv_output_hw",
    "exact_fp32",
    "first_conv",
    "keep_first_conv_fp32",
    "memory_layout",
    "op_dtype",
    "perturbation_conv",
    "replace_submodule",
    "set_stem_references",
    "split_first_conv",
]


class Fp32Input(nn.Module):
    """Runs the wrapped layer in fp32, autocast off; under autocast its output gets its dtype."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) input of any float dtype -> the layer's output (fp32 or autocast dtype)."""
        return _fp32_layer(self.layer, x)


def _fp32_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` in fp32 with autocast off; under autocast the output gets autocast's dtype."""
    device_type = x.device.type
    cast_to = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    )
    with torch.autocast(device_type=device_type, enabled=False):
        y: Tensor = layer(x.float())
    return y if cast_to is None else y.to(cast_to)


class SplitStem(nn.Module):
    """A Conv2d evaluated as conv(ref) + conv(z − ref) with ``ref`` a clean batch set beforehand.

    Exact for any ``ref`` (the convolution and its padding are linear); precise when ``ref`` is the
    clean image of each row, since then only δ = z − ref is rounded to the autocast dtype. Without
    autocast, or before :meth:`set_reference`, or for inputs of another shape, it is the plain fp32
    convolution of z. Rows that share a clean image share its reference: the references are kept
    once per distinct image, and ``ref_index`` maps each row to its own, so a batch of an image's
    ε × signs reads one reference (from cache) instead of one per row. The references live in
    buffers updated in place, so a compiled model that reads them is not recompiled when the batch
    changes.

    ``max_pool`` (set by :func:`~itloop.stimulus.fusion.fuse_conv_relu` where the stem's only
    consumer is the ResNet stem's 3×3/2 max pool) makes the stem return the pooled map. With 2×2
    output blocks it then pools the blocks as the convolution computes them and keeps its
    references in that layout, so neither direction converts a full-resolution map between
    layouts (:func:`~itloop.stimulus.pooling.max_pool_3x3_s2_blocks`).
    """

    ref_input: Tensor
    ref_output: Tensor
    ref_index: Tensor
    weight_padded: Tensor

    def __init__(
        self,
        conv: nn.Conv2d,
        *,
        pad_channels_to: int = 8,
        space_to_depth: bool = True,
        output_block: int = 2,
    ) -> None:
        super().__init__()
        if pad_channels_to < 1:
            raise ValueError(f"pad_channels_to must be >= 1, got {pad_channels_to}")
        if output_block < 1:
            raise ValueError(f"output_block must be >= 1, got {output_block}")
        self.conv = conv
        stride = tuple(conv.stride)
        self.block = (
            int(stride[0])
            if space_to_depth
            and stride[0] == stride[1] > 1
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            else 1
        )
        # output positions in t×t blocks (t = output_block), only with space-to-depth
        self.output_block = output_block if self.block > 1 else 1
        w = conv.weight.detach()
        if self.block > 1:
            w = _blocked_weight(w, self.block, self.output_block)
        c_in = w.shape[1]
        self.padded_channels = (
            -(-c_in // pad_channels_to) * pad_channels_to if conv.groups == 1 else c_in
        )
        extra = self.padded_channels - c_in
        if extra:
            w = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
        self.register_buffer("weight_padded", w.contiguous(), persistent=False)
        self.register_buffer("ref_input", torch.zeros(0), persistent=False)
        self.register_buffer("ref_output", torch.zeros(0), persistent=False)
        self.register_buffer("ref_index", torch.zeros(0, dtype=torch.int64), persistent=False)
        self._max_pool = False

    @property
    def max_pool(self) -> bool:
        """Whether the stem returns its output max-pooled (3×3, stride 2, padding 1)."""
        return self._max_pool

    @max_pool.setter
    def max_pool(self, value: bool) -> None:
        if value != self._max_pool:  # the references' layout depends on it: set them again
            self.ref_index = self.ref_index.new_zeros(0)
        self._max_pool = bool(value)

    @torch.no_grad()
    def set_reference(self, x: Tensor, index: Tensor | None = None) -> None:
        """Use (U, C, H, W) ``x`` as the references; their term is exact fp32. ``x`` is this
        layer's input for the distinct clean images, which in a model is what the layers before it
        make of them (:func:`set_stem_references` finds it); ``index`` (B,) int64 gives each row of
        the batch its image in ``x`` (None: row i is image i)."""
        x = x.detach().float()
        n = x.shape[0]
        if index is None:
            index = torch.arange(n)
        if index.ndim != 1 or index.dtype != torch.int64:
            raise ValueError(f"index must be (B,) int64, got {tuple(index.shape)} {index.dtype}")
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < n:
            raise ValueError(
                f"index must point into the {n} references, got range "
                f"{int(index.min())}..{int(index.max())}"
            )
        index = index.to(x.device, non_blocking=True)
        with exact_fp32():
            y = self.conv(x)
        blocked = self._pooled_blocks(x)
        layout = memory_layout(y)
        if blocked is not None:  # a view; the copy into the buffer below lays it out
            y, layout = blocked.output_to_blocks(y), memory_layout(self.weight_padded)
        # capacity for the batch (every row its own image at most): same buffers batch after batch
        capacity = max(n, index.numel())
        same = (
            self.ref_index.shape == index.shape
            and self.ref_input.shape[0] >= n
            and self.ref_input.shape[1:] == x.shape[1:]
            and self.ref_output.shape[1:] == y.shape[1:]
            and self.ref_input.device == x.device
        )
        if not same:
            self.ref_input = torch.empty(
                (capacity, *x.shape[1:]), dtype=x.dtype, device=x.device
            ).contiguous(memory_format=memory_layout(x))
            self.ref_output = torch.empty(
                (capacity, *y.shape[1:]), dtype=y.dtype, device=y.device
            ).contiguous(memory_format=layout)
            self.ref_index = torch.empty_like(index)
        self.ref_input[:n].copy_(x)
        self.ref_output[:n].copy_(y)
        self.ref_index.copy_(index)

    def forward(self, z: Tensor) -> Tensor:
        """(B, C, H, W) input -> the convolution's output (fp32, or the autocast dtype)."""
        device_type = z.device.type
        if (
            not torch.is_autocast_enabled(device_type)
            or self.ref_index.shape[0] != z.shape[0]
            or self.ref_input.shape[1:] != z.shape[1:]
        ):
            y = _fp32_layer(self.conv, z)
            return max_pool_3x3_s2(y) if self.max_pool else y
        pool_blocks = self._pooled_blocks(z) is not None
        d_out = self.perturbation_term(z, blocks=pool_blocks)
        y = (self.ref_output[self.ref_index] + d_out.float()).to(d_out.dtype)
        if pool_blocks:
            return max_pool_3x3_s2_blocks(y)
        return max_pool_3x3_s2(y) if self.max_pool else y

    def _blocked_geometry(self, x: Tensor) -> _BlockedGeometry | None:
        """The space-to-depth geometry for inputs of x's size (None: the plain convolution)."""
        if self.block == 1:
            return None
        conv = self.conv
        padding = conv.padding  # an int pair: string padding gets no space-to-depth
        assert not isinstance(padding, str)
        return _BlockedGeometry(
            (int(x.shape[2]), int(x.shape[3])),
            (int(conv.kernel_size[0]), int(conv.kernel_size[1])),
            self.block,
            (int(padding[0]), int(padding[1])),
            self.output_block,
        )

    def _pooled_blocks(self, x: Tensor) -> _BlockedGeometry | None:
        """The geometry when the max pool runs on 2×2 output blocks for inputs of x's size."""
        blocked = self._blocked_geometry(x) if self.max_pool and self.output_block == 2 else None
        return blocked if blocked is not None and blocked.whole_blocks else None

    def perturbation_term(self, z: Tensor, *, blocks: bool = False) -> Tensor:
        """conv(z − ref) without bias, in the autocast dtype (call under autocast, after
        :meth:`set_reference` with a batch of z's shape). blocks: return the output as computed,
        in t×t blocks (B, t²·O, Ho/t, Wo/t) (:class:`_BlockedGeometry`)."""
        delta = z.float() - self.ref_input[self.ref_index]
        conv = self.conv
        blocked = self._blocked_geometry(delta)
        if blocked is not None:
            delta = blocked.input_blocks(delta)
        extra = self.padded_channels - delta.shape[1]
        if extra:
            delta = torch.cat([delta, delta.new_zeros(delta.shape[0], extra, *delta.shape[2:])], 1)
        dtype = op_dtype(delta)
        weight = self.weight_padded.to(dtype)
        # the weight's layout (channels_last after the loop's copy is converted) for δ and for
        # the gradient the backward reads
        delta = delta.to(dtype).contiguous(memory_format=memory_layout(weight))
        if blocked is not None:  # a stride-1, unpadded convolution of the blocks
            out: Tensor = perturbation_conv(delta, weight, [1, 1], [0, 0], [1, 1], 1)
            return out if blocks else blocked.output_from_blocks(out)
        padding = conv.padding
        if isinstance(padding, str) or conv.padding_mode != "zeros":
            direct: Tensor = conv._conv_forward(delta, weight, None)
            return direct
        geometry = (
            [int(v) for v in conv.stride],
            [int(v) for v in padding],
            [int(v) for v in conv.dilation],
            int(conv.groups),
        )
        out = perturbation_conv(delta, weight, *geometry)
        return out


class _ReferencesSet(Exception):
    """Stops a forward once every split stem has its reference."""


@torch.no_grad()
def set_stem_references(model: nn.Module, x: Tensor, index: Tensor | None = None) -> None:
    """Give each :class:`SplitStem` of ``model`` the input it receives for the clean images ``x``.

    A stem sees the model's input after whatever comes first (a backbone's ImageNet normalisation,
    for one), so that input, not ``x``, is the reference that makes ``z − ref`` the small
    perturbation the stem rounds; with ``x`` itself the difference would be the normalisation's
    full-size change, and rounding it would erase the perturbation the split exists to keep. The
    model runs in exact fp32 up to the last stem and stops there. ``model`` is the module itself,
    not a compiled wrapper (the stop is an exception raised in a forward pre-hook).

    x: (U, C, H, W) the distinct clean images of a batch; index: (B,) int64 each row's image in
    ``x`` (None: row i is image i).
    """
    stems = [m for m in model.modules() if isinstance(m, SplitStem)]
    if not stems:
        return
    waiting = {id(stem) for stem in stems}

    def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
        assert isinstance(module, SplitStem)
        module.set_reference(args[0], index)
        waiting.discard(id(module))
        if not waiting:
            raise _ReferencesSet

    handles = [stem.register_forward_pre_hook(capture) for stem in stems]
    try:
        with exact_fp32():
            model(x)
    except _ReferencesSet:
        return
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name, m in model.named_modules() if id(m) in waiting]
    raise RuntimeError(f"the forward never reached the split stem(s) {names}")


def op_dtype(x: Tensor) -> torch.dtype:
    """The dtype a custom op's operands take: autocast's where it is on (custom ops are not
    autocast-aware), else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def conv_data_grad(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """The gradient with respect to ``x`` of ``conv2d(x, weight)`` (no bias) for the output
    gradient ``grad``: one data-gradient convolution, no weight gradient."""
    gx: Tensor = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        None,
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        groups,
        [True, False, False],
    )[0]
    return gx


def conv_output_hw(
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of (B, C, H, W) ``x`` with (O, C/g, kh, kw) ``weight``."""
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    h, w = int(x.shape[2]), int(x.shape[3])
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def memory_layout(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored so (and not also NCHW-contiguous), else NCHW."""
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("itloop::perturbation_conv", mutates_args=())
def perturbation_conv(
    delta: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """``conv2d(delta, weight)`` without bias, in delta's dtype and layout.

    An op of its own so that its backward hands the data-gradient convolution an output gradient
    in the convolution's dtype and layout, written by whatever computed it. Traced as a plain
    convolution, the gradient arrived from the compiled graph in fp32 NCHW, and cuDNN's entry point
    cast it and then transposed it: two extra passes over a full-resolution stem activation (on
    an H100 at batch 512, 5 ms a step).
    """
    out = F.conv2d(delta, weight, None, stride, padding, dilation, groups)
    return out.contiguous(memory_format=memory_layout(delta))


@perturbation_conv.register_fake
def _perturbation_conv_fake(
    delta: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    ho, wo = conv_output_hw(delta, weight, stride, padding, dilation)
    return torch.empty(
        (delta.shape[0], int(weight.shape[0]), ho, wo),
        dtype=delta.dtype,
        device=delta.device,
        memory_format=memory_layout(delta),
    )


def _perturbation_conv_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    delta, weight, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(delta, weight)
    ctx.conv = (list(stride), list(padding), list(dilation), int(groups))


def _perturbation_conv_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    delta, weight = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError("perturbation_conv computes the input gradient only")
    stride, padding, dilation, groups = ctx.conv
    g = grad.to(delta.dtype).contiguous(memory_format=memory_layout(delta))
    gx = conv_data_grad(g, delta, weight, stride, padding, dilation, groups)
    return gx, *(None,) * 5


perturbation_conv.register_autograd(
    _perturbation_conv_backward, setup_context=_perturbation_conv_setup
)


class _BlockedGeometry:
    """A stride-s convolution (kernel k, padding p) of an H×W input as a stride-1 one on blocks.

    With S = s·t, the zero-padded input is regrouped in S×S blocks (channel c·S² + i·S + j holds
    row phase i, column phase j) and each output position of the stride-1 convolution computes a
    t×t block of the strided convolution's output (channel (u·t + v)·O + o holds output row phase
    u, column phase v). With t = 1 this is plain space-to-depth. Larger t makes the convolution
    wider (t²·O outputs, C·S² inputs, fewer positions) at the price of zero taps: ResNet's 7×7/2
    stem on 3 channels becomes a 3×3 convolution from 48 to 256 channels for t = 2, against a 4×4
    one from 12 (padded to 16) to 64 for t = 1; tensor cores run the wide one, and its data
    gradient (48 outputs rather than 16), about twice as fast.
    """

    def __init__(
        self,
        hw: tuple[int, int],
        kernel: tuple[int, int],
        stride: int,
        padding: tuple[int, int],
        t: int,
    ) -> None:
        (h, w), (kh, kw), (ph, pw) = hw, kernel, padding
        s = stride
        self.size, self.t, self.padding = s * t, t, padding
        self.hw = h, w
        self.out_hw = (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1
        taps = _blocked_taps((kh, kw), s, t)
        blocks = -(-self.out_hw[0] // t), -(-self.out_hw[1] // t)
        self.padded_hw = (
            self.size * (blocks[0] - 1 + taps[0]),
            self.size * (blocks[1] - 1 + taps[1]),
        )

    def input_blocks(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C·S², Hp/S, Wp/S): the zero-padded input regrouped in S×S blocks."""
        b, c = x.shape[:2]
        (h, w), (ph, pw), (hp, wp), n = self.hw, self.padding, self.padded_hw, self.size
        x = F.pad(x, (pw, wp - w - pw, ph, hp - h - ph))
        x = x.reshape(b, c, hp // n, n, wp // n, n).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * n * n, hp // n, wp // n)

    @property
    def whole_blocks(self) -> bool:
        """Whether the output is whole t×t blocks (no block reaches past its edge)."""
        return self.out_hw[0] % self.t == 0 and self.out_hw[1] % self.t == 0

    def output_to_blocks(self, y: Tensor) -> Tensor:
        """(B, O, Ho, Wo) -> (B, t²·O, Ho/t, Wo/t), the inverse of :meth:`output_from_blocks`
        (whole blocks only)."""
        t = self.t
        b, o, ho, wo = y.shape
        y = y.reshape(b, o, ho // t, t, wo // t, t).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(b, t * t * o, ho // t, wo // t)

    def output_from_blocks(self, y: Tensor) -> Tensor:
        """(B, t²·O, Hb, Wb) output blocks -> (B, O, Ho, Wo), the strided convolution's output."""
        t = self.t
        if t == 1:
            return y
        b, _, hb, wb = y.shape
        y = y.reshape(b, t, t, -1, hb, wb).permute(0, 3, 4, 1, 5, 2)
        y = y.reshape(b, -1, hb * t, wb * t)
        return y[:, :, : self.out_hw[0], : self.out_hw[1]]


def _blocked_taps(kernel: tuple[int, int], s: int, t: int) -> tuple[int, int]:
    """Kernel size of the stride-1 convolution on (s·t)² blocks computing t×t output blocks."""
    return -(-(s * (t - 1) + kernel[0]) // (s * t)), -(-(s * (t - 1) + kernel[1]) // (s * t))


def _blocked_weight(w: Tensor, s: int, t: int) -> Tensor:
    """(O, C, kh, kw) weights of a stride-s conv -> (t²·O, C·S², Ah, Aw), S = s·t, of the stride-1
    conv of :class:`_BlockedGeometry`: output phase (u, v) at block tap (a, b) and input phase
    (i, j) is the original tap (S·a + i − s·u, S·b + j − s·v), zero where that is outside."""
    o, c, kh, kw = w.shape
    n = s * t
    ah, aw = _blocked_taps((kh, kw), s, t)
    phases = []
    for u in range(t):
        for v in range(t):
            wuv = F.pad(w, (s * v, n * aw - kw - s * v, s * u, n * ah - kh - s * u))
            wuv = wuv.reshape(o, c, ah, n, aw, n).permute(0, 1, 3, 5, 2, 4)
            phases.append(wuv.reshape(o, c * n * n, ah, aw))
    return torch.cat(phases, dim=0)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """(name, module) of the model's first Conv2d in registration order; ValueError when none."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d")


def split_first_conv(
    model: nn.Module,
    *,
    pad_channels_to: int = 8,
    space_to_depth: bool = True,
    output_block: int = 2,
) -> nn.Module:
    """Replace the model's first Conv2d by a :class:`SplitStem`; modifies and returns ``model``."""
    if any(isinstance(m, SplitStem) for m in model.modules()):
        return model
    name, conv = first_conv(model)
    stem = SplitStem(
        conv,
        pad_channels_to=pad_channels_to,
        space_to_depth=space_to_depth,
        output_block=output_block,
    )
    replace_submodule(model, name, stem)
    return model


def keep_first_conv_fp32(model: nn.Module) -> nn.Module:
    """Wrap the model's first Conv2d (in registration order, the stem in torchvision/timm) in
    Fp32Input.

    Modifies and returns ``model``; raises ValueError when it has no Conv2d.
    """
    for name, module in model.named_modules():
        if isinstance(module, Fp32Input):
            return model
        if isinstance(module, nn.Conv2d):
            replace_submodule(model, name, Fp32Input(module))
            return model
    raise ValueError(f"{type(model).__name__} has no Conv2d to keep in fp32")


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the dotted ``name`` is in ``model`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def check_same_function(
    model: nn.Module, changed: nn.Module, example: Tensor, *, rtol: float, what: str
) -> None:
    """Raise ValueError when ``changed`` does not compute ``model``'s function on ``example`` in
    exact fp32 (relative error of the outputs > rtol); ``what`` names the change."""
    with torch.no_grad(), exact_fp32():
        ref = model(example).float()
        out = changed(example).float()
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err <= rtol:
        raise ValueError(f"{what} changed the output: relative error {err:.3g} > {rtol:.3g}")


def conv_fp32_precision() -> str:
    """cuDNN's fp32 convolution precision: 'tf32', 'ieee' or 'none' (= PyTorch default)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return str(getattr(conv, "fp32_precision", "none"))


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Autocast off and IEEE fp32 (no TF32) for cuDNN convolutions and matmuls, restored on exit."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = getattr(torch.backends.cuda, "matmul", None)
    saved = [
        (obj, getattr(obj, "fp32_precision", None)) for obj in (conv, matmul) if obj is not None
    ]
    try:
        for obj, value in saved:
            if value is not None:
                obj.fp32_precision = "ieee"
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        for obj, value in saved:
            if value is not None:
                obj.fp32_precision = value
