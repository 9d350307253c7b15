"""Numerics that keep a small perturbation intact: an fp32 first layer under autocast, exact fp32.

Casting ``x + δ`` to bf16 (8 significant bits) erases about a quarter of an ε = 1 perturbation: its
per-pixel change (~0.003) is below half a bf16 step for most pixel values. So the image, δ and the
projection stay fp32, and the first convolution runs with autocast off on its fp32 input; only its
output enters the bf16 part of the network. cuDNN may still run that fp32 convolution in TF32 (11
significant bits; PyTorch's default for convolutions) inside the attack loop; the predictions that
are stored with a stimulus are computed under :func:`exact_fp32`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["Fp32Input", "conv_fp32_precision", "exact_fp32", "keep_first_conv_fp32"]


class Fp32Input(nn.Module):
    """Runs the wrapped layer in fp32, autocast off; under autocast its output gets its dtype."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) input of any float dtype -> the layer's output (fp32 or autocast dtype)."""
        device_type = x.device.type
        cast_to = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else None
        )
        with torch.autocast(device_type=device_type, enabled=False):
            y: Tensor = self.layer(x.float())
        return y if cast_to is None else y.to(cast_to)


def keep_first_conv_fp32(model: nn.Module) -> nn.Module:
    """Wrap the model's first Conv2d (in registration order, the stem in torchvision/timm) in
    Fp32Input.

    Modifies and returns ``model``; raises ValueError when it has no Conv2d.
    """
    for name, module in model.named_modules():
        if isinstance(module, Fp32Input):
            return model
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Fp32Input(module))
            return model
    raise ValueError(f"{type(model).__name__} has no Conv2d to keep in fp32")


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
