"""Data-gradient convolutions with their epilogue (residual sum, ReLU mask) fused by cuDNN.

The attack's backward pass through a ResNet is a chain of data-gradient convolutions, each followed
by a pointwise pass: the ReLU mask of the convolution's input and, at a block's entry, the sum with
the gradient of the residual path. PyTorch exposes cuDNN's fused epilogues only for forward
convolutions, so those passes are separate kernels that write and read every activation gradient
once more. cuDNN's graph API (the ``nvidia-cudnn-frontend`` package, ``import cudnn``) builds one
kernel for ``relu_backward(dgrad(dy, w) [+ r], x)``: the sum and the mask are applied while the
tile of the gradient is still on chip, in fp32, and rounded once.

:func:`dgrad_epilogue` runs one such graph on CUDA tensors. Each distinct operand geometry is
built once: every plan cuDNN proposes is timed on the first call's own operands and the fastest is
kept (:func:`plans` lists the choices). :func:`available` says whether the path can run for a
tensor; where it cannot (CPU, fp32, no frontend installed) callers use the plain composition.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "dgrad_epilogue", "frontend_error", "plans"]

_DTYPES = (torch.float16, torch.bfloat16)
_lock = threading.Lock()
_frontend: Any = None
_frontend_error: str | None = None
_handles: dict[tuple[int, int], Any] = {}


@dataclass
class _Plan:
    graph: Any
    tensors: dict[str, Any]
    index: int
    name: str
    workspace: int
    ms: float
    candidates: int


_plans: dict[tuple[Any, ...], _Plan | None] = {}


def _cudnn() -> Any:
    """The frontend module, imported once; None if absent (:func:`frontend_error` says why)."""
    global _frontend, _frontend_error
    if _frontend is None and _frontend_error is None:
        try:
            import cudnn

            version = int(cudnn.backend_version())
            if version < 90000:
                raise RuntimeError(f"cuDNN backend {version} is older than 9.0")
            _frontend = cudnn
        except Exception as exc:  # ImportError, or a libcudnn the frontend cannot load
            _frontend_error = f"{type(exc).__name__}: {exc}"
    return _frontend


def frontend_error() -> str | None:
    """Why cuDNN's graph API is unusable here (None when it is usable)."""
    _cudnn()
    return _frontend_error


def available(t: Tensor) -> bool:
    """Whether :func:`dgrad_epilogue` runs for operands like ``t`` (CUDA, fp16/bf16, 4-D)."""
    return (
        t.is_cuda
        and t.ndim == 4
        and t.dtype in _DTYPES
        and bool(torch.backends.cudnn.enabled)
        and _cudnn() is not None
    )


def _handle(device: torch.device) -> Any:
    cudnn = _cudnn()
    key = (int(device.index or 0), threading.get_ident())
    handle = _handles.get(key)
    if handle is None:
        with torch.cuda.device(device):
            handle = cudnn.create_handle()
        _handles[key] = handle
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    return handle


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _key(
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    conv: tuple[tuple[int, ...], ...],
    relu_mask: bool,
) -> tuple[Any, ...]:
    def geo(t: Tensor | None) -> Any:
        return None if t is None else (tuple(t.shape), tuple(t.stride()))

    return (
        grad.device.index,
        grad.dtype,
        geo(grad),
        geo(weight),
        geo(x),
        geo(residual),
        conv,
        relu_mask,
    )


def _build(
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    conv: tuple[tuple[int, ...], ...],
    relu_mask: bool,
    out: Tensor,
) -> _Plan | None:
    """Build the graph, time every plan on these operands, keep the fastest (None: unsupported)."""
    cudnn = _cudnn()
    stride, padding, dilation = (list(v) for v in conv)
    bf16 = grad.dtype == torch.bfloat16
    io = cudnn.data_type.BFLOAT16 if bf16 else cudnn.data_type.HALF
    handle = _handle(grad.device)
    g = cudnn.pygraph(
        io_data_type=io,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )

    def tensor(t: Tensor, name: str) -> Any:
        return g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=io)

    tensors = {"dy": tensor(grad, "dy"), "w": tensor(weight, "w")}
    dx = g.conv_dgrad(
        loss=tensors["dy"], filter=tensors["w"], padding=padding, stride=stride, dilation=dilation
    )
    dx.set_dim(list(x.shape))
    dx.set_stride(list(x.stride()))
    if residual is not None:
        tensors["r"] = tensor(residual, "r")
        dx = g.add(a=dx, b=tensors["r"])
    if relu_mask:
        tensors["x"] = tensor(x, "x")
        dx = g.relu_backward(loss=dx, input=tensors["x"])
    dx.set_output(True).set_data_type(io)
    dx.set_stride(list(out.stride()))
    tensors["out"] = dx
    try:
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans(cudnn.build_plan_policy.ALL)
    except Exception:  # no engine takes this graph: the caller composes instead
        return None
    count = int(g.get_execution_plan_count())
    pack = _pack(tensors, grad, weight, x, residual, out)
    best: tuple[float, int, int] | None = None
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    stop = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    for i in range(count):
        try:
            size = int(g.get_workspace_size_plan_at_index(i))
            ws = torch.empty(max(size, 1), dtype=torch.uint8, device=grad.device)
            g.execute_plan_at_index(pack, ws, i, handle=handle)  # warm-up (and: does it run?)
            start.record()
            for _ in range(3):
                g.execute_plan_at_index(pack, ws, i, handle=handle)
            stop.record()
            stop.synchronize()
        except Exception:  # a plan that fails to run is skipped
            continue
        ms = start.elapsed_time(stop) / 3
        if best is None or ms < best[0]:
            best = (ms, i, size)
    if best is None:
        return None
    ms, index, size = best
    return _Plan(g, tensors, index, str(g.get_plan_name_at_index(index)), size, ms, count)


def _pack(
    tensors: dict[str, Any],
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    out: Tensor,
) -> dict[Any, Tensor]:
    pack = {tensors["dy"]: grad, tensors["w"]: weight, tensors["out"]: out}
    if "r" in tensors:
        assert residual is not None
        pack[tensors["r"]] = residual
    if "x" in tensors:
        pack[tensors["x"]] = x
    return pack


def dgrad_epilogue(
    grad: Tensor,
    weight: Tensor,
    x: Tensor,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu_mask: bool,
) -> Tensor | None:
    """``(conv_input_grad(grad, weight) [+ residual]) * (x > 0 if relu_mask)`` as one cuDNN kernel.

    grad: (B, O, Ho, Wo) gradient of the convolution's output; weight: (O, C, kh, kw) (ungrouped);
    x: (B, C, H, W) the convolution's input (its shape and, with relu_mask, its mask); residual:
    None or (B, C, H, W). All CUDA, one of fp16/bf16; taken channels_last. Returns the (B, C, H, W)
    channels_last gradient, or None where cuDNN has no plan for this geometry (the caller composes).
    A new geometry is built and its plans timed on first use, which cannot happen while a CUDA graph
    is being captured.
    """
    if not available(grad):
        raise RuntimeError(
            f"cuDNN graph API unavailable for {grad.device} {grad.dtype}: "
            f"{frontend_error() or 'needs CUDA fp16/bf16 4-D operands'}"
        )
    grad, weight, x = _channels_last(grad), _channels_last(weight), _channels_last(x)
    residual = None if residual is None else _channels_last(residual)
    conv = (tuple(stride), tuple(padding), tuple(dilation))
    key = _key(grad, weight, x, residual, conv, relu_mask)
    out = torch.empty_like(x)
    with _lock:
        if key not in _plans:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "a new data-gradient geometry cannot be planned during CUDA graph capture: "
                    f"run one eager step first (operands {tuple(grad.shape)} -> {tuple(x.shape)})"
                )
            _plans[key] = _build(grad, weight, x, residual, conv, relu_mask, out)
        plan = _plans[key]
    if plan is None:
        return None
    ws = torch.empty(max(plan.workspace, 1), dtype=torch.uint8, device=grad.device)
    pack = _pack(plan.tensors, grad, weight, x, residual, out)
    plan.graph.execute_plan_at_index(pack, ws, plan.index, handle=_handle(grad.device))
    return out


def plans() -> list[dict[str, Any]]:
    """The geometries built so far: shapes, the plan kept and its time (None: composed)."""
    rows = []
    for key, plan in list(_plans.items()):
        _device, _dtype, grad, weight, x, residual, conv, relu_mask = key
        rows.append(
            {
                "grad": list(grad[0]),
                "weight": list(weight[0]),
                "input": list(x[0]),
                "residual": residual is not None,
                "relu_mask": relu_mask,
                "stride": list(conv[0]),
                "plan": None if plan is None else plan.name,
                "ms": None if plan is None else round(plan.ms, 4),
                "plans_tried": None if plan is None else plan.candidates,
            }
        )
    return rows
