"""BatchNorm folded into the preceding convolution: an eval-mode model transform for the attack
loop.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from itloop.stimulus.precision import check_same_function, exact_fp32, replace_submodule

__all__ = ["fold_batchnorm"]


def _conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs whose BatchNorm2d reads exactly that Conv2d's output, seen in one
    run.
    """
    conv_out: dict[int, tuple[str, Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(name: str) -> object:
        def hook(_m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            conv_out[id(out)] = (name, out)

        return hook

    def bn_hook(name: str) -> object:
        def hook(_m: nn.Module, inp: tuple[Tensor, ...]) -> None:
            calls[name] = calls.get(name, 0) + 1
            hit = conv_out.get(id(inp[0]))
            if hit is not None and hit[1] is inp[0]:
                pairs.append((hit[0], name))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))  # type: ignore[arg-type]
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))  # type: ignore[arg-type]
    try:
        with torch.no_grad(), exact_fp32():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(c, b) for c, b in pairs if calls.get(c) == 1 and calls.get(b) == 1]


def fold_batchnorm(model: nn.Module, example: Tensor, *, rtol: float = 1e-4) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm2d folded into the Conv2d that feeds it.

    example: (B, C, H, W) input used to find conv → BN pairs by running the model once, and to check
    that the folded copy computes the same function in fp32 (relative error ≤ rtol, else
    ValueError). Pairs are found from the data flow, not from names, so any architecture works; a
    conv whose output also feeds something other than its BN would fail that check rather than fold
    silently.
    """
    if model.training:
        raise ValueError(
            f"fold_batchnorm needs an eval-mode model; {type(model).__name__} is training"
        )
    folded = copy.deepcopy(model).eval()
    pairs = _conv_bn_pairs(folded, example)
    for conv_name, bn_name in pairs:
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"{conv_name}/{bn_name} are not Conv2d/BatchNorm2d")
        fused = fuse_conv_bn_eval(conv, bn)
        replace_submodule(folded, conv_name, fused)
        replace_submodule(folded, bn_name, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    check_same_function(model, folded, example, rtol=rtol, what="folding BatchNorm")
    return folded
