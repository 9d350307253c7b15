"""``itloop bench attack``: our per-site PGD engine against torchattacks.PGDL2, same run, model,
batch, device.

Prints one JSON object: device, batch, steps, image-steps/s, TFLOP/s and % of the device's dense
bf16 peak for both; attack quality of both at equal steps and ε (mean predicted |Δf| of the better
sign, exact fp32); and the lab-day estimate (200 sites × 42 images × 6 ε × 2 signs × 100 steps,
quantisation and PNG writing included) measured on a few batches and extrapolated. One image-step
is one forward plus one input-gradient backward of one image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from itloop.stimulus import cudnn_graphs
from itloop.stimulus.attacks import (
    MATMUL_1X1,
    AttackConfig,
    AttackEngine,
    AttackResult,
    AttackRows,
)
from itloop.stimulus.blocks import count_blocks
from itloop.stimulus.images import write_png_bytes
from itloop.stimulus.pipeline import (
    CHUNK_ROWS,
    PngWriter,
    attack_and_store,
    day_chunks,
    png_workers,
)
from itloop.stimulus.precision import conv_fp32_precision
from itloop.stimulus.quantisation import from_levels, realised_eps_l2, to_levels

__all__ = [
    "PEAK_BF16_DENSE_TFLOPS",
    "bench_images",
    "build_model",
    "describe_model",
    "emit_json",
    "main",
    "peak_bf16_tflops",
]

PEAK_BF16_DENSE_TFLOPS: dict[str, float] = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.2,
}
"""Dense (no sparsity) bf16 tensor-core peak by device-name substring, vendor datasheets, TFLOP/s.
"""

ESTIMATE_FLOP_PER_IMAGE_STEP = 14.6e9
"""ResNet-50 → layer4.0 at 224×224, forward + input-gradient backward (FlopCounterMode gives
14.60e9).
"""

LAB_DAY = {"sites": 200, "images_per_site": 42, "eps": 6, "signs": 2, "steps": 100}
LAB_DAY_EPS = (0.5, 1.0, 2.0, 4.0, 7.0, 10.0)
"""A day's ε list across the paper's range (0.5 … 10)."""
_LAB_DAY_PAIR_ROWS = LAB_DAY["eps"] * LAB_DAY["signs"]
_LAB_DAY_SITE_ROWS = LAB_DAY["images_per_site"] * _LAB_DAY_PAIR_ROWS


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by name (longest matching key), or None when unknown (CPUs)."""
    hits = [k for k in PEAK_BF16_DENSE_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_DENSE_TFLOPS[max(hits, key=len)] if hits else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itloop bench attack", description=__doc__)
    p.add_argument("--backbone", default=None, help="default: resnet50 (--quick: tiny)")
    p.add_argument("--layer", default=None, help="backbone layer to cut after (default: its own)")
    p.add_argument("--input-hw", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default 512; quick 8)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 100; quick 3)")
    p.add_argument("--eps", type=float, default=1.0, help="L2 budget in [0, 1] image units")
    p.add_argument("--sites", type=int, default=None, help="sites in the readout (default 200)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's)")
    p.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--split-first-conv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first conv as exact conv(x) + bf16 conv(δ) (default) or one fp32 conv of x + δ",
    )
    p.add_argument(
        "--stem-output-block",
        type=int,
        default=AttackConfig.stem_output_block,
        metavar="T",
        help="the split stem computes T×T output blocks per position (default %(default)s; "
        "1: plain space-to-depth)",
    )
    p.add_argument(
        "--fuse-conv-relu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="conv + bias (+ residual) + ReLU as one cuDNN kernel (default) or separate kernels",
    )
    p.add_argument(
        "--fuse-blocks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ResNet bottlenecks as one op each, whose backward fuses ReLU masks and residual sums "
        "into cuDNN data-gradient convolutions (default) or autograd's composition",
    )
    p.add_argument(
        "--gemm-templates",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="compile matmuls as Triton GEMMs with fused prologues and epilogues (autotuned: "
        "minutes to compile)",
    )
    p.add_argument(
        "--matmul-1x1",
        choices=MATMUL_1X1,
        default=AttackConfig.matmul_1x1,
        help="1×1 convs: cuDNN (none), cuDNN forward + matmul input gradient (dgrad), or "
        "matmuls both ways (all)",
    )
    p.add_argument(
        "--projection-iterations",
        type=int,
        default=AttackConfig.projection_iterations,
        help="active-set updates of the ball∩box projection per step (default %(default)s)",
    )
    p.add_argument(
        "--triton-step",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with compile on CUDA, the projected step as Triton kernels over tiles of each row, "
        "or inductor's kernel with one program per row (default: on with cuda)",
    )
    p.add_argument(
        "--gradient-dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="dtype the loop's input gradient comes back in (default: bf16 on cuda, else fp32)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print the N most expensive kernels of 3 profiled steps (device kernels on a "
        "GPU, ATen ops on a CPU), each with the op that launched it",
    )
    p.add_argument(
        "--profile-run",
        action="store_true",
        help="also print where one AttackEngine.run's time goes (PGD, quantisation, scoring)",
    )
    p.add_argument("--torchattacks", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lab-day", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--lab-day-batches",
        type=int,
        default=3,
        help="the lab-day figure's long slice has this many batches more than its short one, "
        "which has 2 (default 3)",
    )
    p.add_argument(
        "--lab-day-chunk-rows",
        type=int,
        default=CHUNK_ROWS,
        help="rows in each of the worker's generation chunks, about, for its lab-day figure "
        "(default %(default)s, the worker's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="tiny CPU config: seconds, for tests")
    return p


def build_model(
    backbone: str, n_sites: int, layer: str | None, hw: tuple[int, int]
) -> tuple[nn.Module, str]:
    """The model of IT: (B, 3, H, W) in [0, 1] -> (B, N) site responses, and where it came from."""
    try:
        import itloop.models

        it_model = getattr(itloop.models, "ITModel", None)
        why = "itloop.models has no ITModel"
    except ImportError as exc:
        it_model, why = None, f"itloop.models failed to import: {exc}"
    if it_model is None:
        return _StandInModel(backbone, n_sites, layer, hw), f"stimulus.benchmark stand-in ({why})"
    kwargs: dict[str, Any] = {"input_hw": hw, "seed": 0}
    if layer is not None:
        kwargs["layer"] = layer
    model: nn.Module = it_model.build(backbone, n_sites, **kwargs)
    return model, "itloop.models.ITModel"


class _StandInModel(nn.Module):
    """Used only while itloop.models has no ITModel: normalisation, a trunk, a factorised readout.

    resnet50: torchvision ResNet-50 (random init) cut after layer4.0, as in the paper; tiny: a few
    conv + BatchNorm layers. Readout: per-site spatial mask × channel weights, N(0, 1) scaled.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, backbone: str, n_sites: int, layer: str | None, hw: tuple[int, int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        if backbone == "resnet50":
            import torchvision

            net = torchvision.models.resnet50(weights=None)
            if layer not in (None, "layer4.0"):
                raise ValueError(f"the stand-in model cuts only after layer4.0, not {layer!r}")
            self.trunk: nn.Module = nn.Sequential(
                net.conv1,
                net.bn1,
                net.relu,
                net.maxpool,
                net.layer1,
                net.layer2,
                net.layer3,
                net.layer4[0],
            )
        elif backbone == "tiny":
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(),
            )
        else:
            raise ValueError(f"unknown backbone {backbone!r}: resnet50 or tiny")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        with torch.no_grad():
            feats = self.trunk(torch.zeros(1, 3, *hw))
        c, h, w = feats.shape[1:]
        self.spatial = nn.Parameter(torch.randn(n_sites, h, w) / math.sqrt(h * w))
        self.channel = nn.Parameter(torch.randn(n_sites, c) / math.sqrt(c))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N)."""
        feats = self.trunk((x - self.mean) / self.std)
        pooled = torch.einsum("bchw,nhw->bnc", feats, self.spatial.to(feats.dtype))
        return (pooled * self.channel.to(feats.dtype)).sum(-1)


class _TwoLogit(nn.Module):
    """One site per row as 2 logits [f − f₀, −(f − f₀)]: CE with label 1 pushes f up, label 0 down.

    Centring on the clean prediction f₀ keeps the softmax out of saturation, so torchattacks sees a
    non-vanishing gradient along ±∇f (the same direction ours follows) at every row.
    """

    def __init__(self, model: nn.Module, site: Tensor, offset: Tensor) -> None:
        super().__init__()
        self.model = model
        self.site = site
        self.offset = offset

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 2) logits."""
        f = self.model(x).gather(1, self.site.unsqueeze(1)).squeeze(1) - self.offset
        return torch.stack([f, -f], dim=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _flop_per_image_step(model: nn.Module, hw: tuple[int, int], device: torch.device) -> float:
    """FLOPs of one forward + input-gradient backward (FlopCounterMode, a batch of 2)."""
    x = torch.rand(2, 3, *hw, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        out.sum().backward()
    return float(counter.get_total_flops()) / 2


def bench_images(n: int, hw: tuple[int, int], device: torch.device, gen: torch.Generator) -> Tensor:
    """(n, 3, H, W) smooth random images on the 8-bit grid (speed and quality need no photos)."""
    coarse = torch.rand(n, 3, max(hw[0] // 8, 2), max(hw[1] // 8, 2), generator=gen)
    fine = torch.rand(n, 3, *hw, generator=gen)
    img = F.interpolate(coarse, size=hw, mode="bilinear", align_corners=False) * 0.85 + fine * 0.15
    return from_levels(to_levels(img.clamp(0, 1))).to(device)


def _rate(
    name: str, rows: int, steps: int, seconds: float, flop: float, peak: float | None
) -> dict[str, Any]:
    rate = rows * steps / seconds
    tflops = rate * flop / 1e12
    return {
        "image_steps_per_s": round(rate, 1),
        "tflops": float(f"{tflops:.4g}"),
        "pct_of_bf16_dense_peak": None if peak is None else round(100 * tflops / peak, 2),
        "seconds": round(seconds, 3),
        "what": name,
    }


def _best_sign_mean(change: Tensor) -> float:
    """(2P,) changes of rows ordered (pair, sign) -> mean over pairs of the larger |change|."""
    return float(change.abs().view(-1, 2).max(dim=1).values.mean())


_KERNEL_NAME_CHARS = 140
"""Kernel names are cut to this length in the profile (templated ones run to hundreds of chars)."""


def _launch_site(ev: Any) -> str:
    """Where a profiler event launched its kernels: the op's name and first input's shape, then up
    to three enclosing ops or regions, innermost first (a name its parent repeats is given once)."""
    shape = next((list(s) for s in ev.input_shapes or [] if s), None)
    names = [ev.name]
    parent = ev.cpu_parent
    while parent is not None and len(names) < 4:
        if parent.name != names[-1]:
            names.append(parent.name)
        parent = parent.cpu_parent
    if shape is not None:
        names[0] = f"{ev.name} {shape}"
    return " < ".join(names)


def kernel_launchers(events: Iterable[Any]) -> dict[str, str]:
    """Each device kernel's launch site (:func:`_launch_site`) that took most of its time, from a
    profiler's events: tells an ATen op's hidden copy or cast from the work it was called for."""
    by_kernel: dict[str, dict[str, float]] = {}
    for ev in events:
        kernels = getattr(ev, "kernels", None) or []
        site = _launch_site(ev) if kernels else ""
        for k in kernels:
            _add_time(by_kernel, k.name, site, float(k.duration))
    return _heaviest_sites(by_kernel)


def _add_time(table: dict[str, dict[str, float]], name: str, site: str, us: float) -> None:
    """Add ``us`` to ``name``'s time at ``site`` (names cut as the profile's rows are)."""
    sites = table.setdefault(name[:_KERNEL_NAME_CHARS], {})
    sites[site] = sites.get(site, 0.0) + us


def _heaviest_sites(table: dict[str, dict[str, float]]) -> dict[str, str]:
    """Each name's site with the most time."""
    return {name: max(sites, key=lambda s: sites[s]) for name, sites in table.items()}


def op_callers(events: Iterable[Any]) -> dict[str, str]:
    """Each CPU op's caller (:func:`_launch_site` of the op around it) that took most of its own
    time, from a profiler's events: the CPU's counterpart of :func:`kernel_launchers`."""
    by_op: dict[str, dict[str, float]] = {}
    for ev in events:
        own = float(getattr(ev, "self_cpu_time_total", 0.0) or 0.0)
        if own > 0 and ev.cpu_parent is not None:
            _add_time(by_op, ev.name, _launch_site(ev.cpu_parent), own)
    return _heaviest_sites(by_op)


def kernel_rows(
    averages: Iterable[Any], launchers: dict[str, str], *, cuda: bool
) -> list[dict[str, Any]]:
    """A profile's kernels with their own time, most first, from its averaged events: device
    kernels on CUDA, where the regions the device timeline repeats (a compiled graph's call, a
    ``record_function`` range) are left out, since their time is their kernels' again; ATen ops
    (and regions) by their own CPU time otherwise. Each names its launch site from
    ``launchers``."""
    rows = []
    for ev in averages:
        if cuda:
            kernel = ev.device_type.name == "CUDA" and not getattr(ev, "is_user_annotation", False)
            own_us = float(getattr(ev, "self_device_time_total", 0.0) or 0.0) if kernel else 0.0
        else:
            own_us = float(ev.self_cpu_time_total or 0.0)
        if own_us > 0:
            key = ev.key[:_KERNEL_NAME_CHARS]
            rows.append(
                {
                    "kernel": key,
                    "calls": ev.count,
                    "ms": round(own_us / 1e3, 3),
                    "launched_by": launchers.get(key),
                }
            )
    rows.sort(key=lambda r: -r["ms"])
    return rows


def _profiled(fn: Callable[[], Any], device: torch.device, *, record_shapes: bool = False) -> Any:
    """The torch profiler after one call of ``fn``, the device's work finished inside it: CPU ops,
    and on CUDA the device's kernels too."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        fn()
        _sync(device)
    return prof


def _profile(
    fn: Callable[[], Any], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """The ``args.profile`` kernels with the most total time over one call of ``fn``, each with
    the op that launched it: device kernels on a GPU, ATen ops (by their own time) on a CPU."""
    cuda = device.type == "cuda"
    prof = _profiled(fn, device, record_shapes=True)
    events = prof.events()
    launchers = kernel_launchers(events) if cuda else op_callers(events)
    rows = kernel_rows(prof.key_averages(), launchers, cuda=cuda)
    total = sum(r["ms"] for r in rows)
    for r in rows[: args.profile]:
        print(
            f"{r['ms']:9.2f} ms {100 * r['ms'] / total:5.1f}% {r['calls']:5d}x  {r['kernel']}\n"
            f"{'':27}from {r['launched_by']}",
            file=sys.stderr,
        )
    where = "device" if cuda else "CPU (ops' own)"
    print(f"{total:9.2f} ms total {where} time over the profiled call", file=sys.stderr)
    return rows[: args.profile]


def _lab_day_slice(
    engine: AttackEngine,
    args: argparse.Namespace,
    hw: tuple[int, int],
    device: torch.device,
    gen: torch.Generator,
    batches: int,
) -> dict[str, Any]:
    """About ``batches`` batches of rows laid out as the day's, run as the worker runs them: wall
    time from the first clean PNG to the last stimulus stored."""
    b = args.batch
    per_pair = len(LAB_DAY_EPS) * LAB_DAY["signs"]
    pairs = max(1, batches * b // per_pair)
    clean = to_levels(bench_images(pairs, hw, torch.device("cpu"), gen))
    sites = torch.randint(0, args.sites, (pairs,), generator=gen)
    rows = AttackRows.grid(torch.arange(pairs), sites, LAB_DAY_EPS)
    workers = png_workers()
    with (
        tempfile.TemporaryDirectory() as tmp,
        PngWriter(lambda data: write_png_bytes(data, Path(tmp))[0], workers=workers) as writer,
    ):
        _sync(device)
        t0 = time.perf_counter()
        writer.submit(list(clean))
        kept = attack_and_store(
            engine,
            clean,
            rows,
            generator=torch.Generator().manual_seed(args.seed),
            writer=writer,
            device=device,
        )
        stored = len(writer.results())
        wall_s = time.perf_counter() - t0
    return {
        "rows": len(rows),
        "batches": math.ceil(len(rows) / b),
        "kept_stimuli": len(kept.result),
        "pngs_stored": stored,
        "png_workers": workers,
        "wall_s": round(wall_s, 3),
    }


def _extrapolate_day(
    short: dict[str, Any],
    long: dict[str, Any],
    batch: int,
    extra_per_batch_s: float,
    chunk_rows: int,
) -> dict[str, float]:
    """A lab day's seconds from two slices (``wall_s`` over ``batches``): the steady-state time of
    a batch is their difference per batch, and what the short slice took beyond its batches comes
    once per run. ``one_run_s``: the day as one run; ``worker_s``: as the worker makes it, one run
    per chunk of its (image, site) pairs (:func:`day_chunks` of about ``chunk_rows`` rows,
    each run padding its last batch). ``extra_per_batch_s`` is added to every batch (the steps the
    slices did not run)."""
    per_batch_s = float(long["wall_s"] - short["wall_s"]) / max(
        int(long["batches"]) - int(short["batches"]), 1
    )
    once_s = float(short["wall_s"]) - int(short["batches"]) * per_batch_s

    def run_s(pairs: int) -> float:
        batches = math.ceil(pairs * _LAB_DAY_PAIR_ROWS / batch)
        return once_s + batches * (per_batch_s + extra_per_batch_s)

    n_pairs = LAB_DAY["sites"] * LAB_DAY["images_per_site"]
    chunks = day_chunks(n_pairs, _LAB_DAY_PAIR_ROWS, batch, chunk_rows)
    return {
        "per_batch_s": per_batch_s,
        "one_run_s": run_s(n_pairs),
        "worker_s": sum(run_s(end - start) for start, end in chunks),
        "worker_chunks": len(chunks),
        "worker_chunk_rows": (chunks[0][1] - chunks[0][0]) * _LAB_DAY_PAIR_ROWS,
    }


def _lab_day(
    engine: AttackEngine,
    args: argparse.Namespace,
    hw: tuple[int, int],
    device: torch.device,
    gen: torch.Generator,
    *,
    pgd_batch_s: float,
) -> dict[str, Any]:
    """Slices of a lab day measured end to end as the worker runs them, then extrapolated.

    Two slices of the day's layout (each image × its site × 6 ε × 2 signs), 2 and 2 +
    ``args.lab_day_batches`` batches, attacked and quantised batch by batch while the kept
    stimuli and the clean images are encoded and stored as PNGs (fsync'd, content-addressed) on
    CPU threads. Their difference is the time of a batch in the steady state; the short slice
    carries what a day has once (the first batch's start, the last batch's PNGs), so the day is
    the short slice plus the day's other batches at the steady-state time. With fewer steps than
    the day's, each batch's missing steps are added at the PGD time measured for one batch
    (``pgd_batch_s`` for ``args.steps`` steps); the rest of a batch does not grow with steps.
    """
    b, steps = args.batch, args.steps
    short = _lab_day_slice(engine, args, hw, device, gen, 2)
    long = _lab_day_slice(engine, args, hw, device, gen, 2 + max(1, args.lab_day_batches))
    extra_per_batch_s = pgd_batch_s * (LAB_DAY["steps"] - steps) / max(steps, 1)
    day_rows = LAB_DAY["sites"] * _LAB_DAY_SITE_ROWS
    day = _extrapolate_day(short, long, b, extra_per_batch_s, args.lab_day_chunk_rows)
    in_rows = (long["wall_s"] + long["batches"] * extra_per_batch_s) * day_rows / long["rows"]
    return {
        "protocol": LAB_DAY,
        "eps_l2": list(LAB_DAY_EPS),
        "rows": day_rows,
        "batches": math.ceil(day_rows / b),
        "image_steps": day_rows * LAB_DAY["steps"],
        "measured_slices": [short, long],
        "steps": steps,
        "batch_steady_state_s": round(day["per_batch_s"], 3),
        "estimate_s": round(day["one_run_s"], 1),
        "estimate_min": round(day["one_run_s"] / 60, 2),
        "long_slice_scaled_in_rows_min": round(in_rows / 60, 2),
        "worker_chunks": day["worker_chunks"],
        "worker_chunk_rows": day["worker_chunk_rows"],
        "worker_estimate_min": round(day["worker_s"] / 60, 2),
        "method": (
            "rows of the day's layout attacked batch by batch with AttackEngine (random start, "
            "PGD, budget check, quantisation-aware rounding, exact-fp32 f(x) and f(x+δ)), the "
            "larger change kept, its PNG and the clean images' encoded and stored on CPU threads "
            "while the device runs the next batch (itloop.stimulus.pipeline, as the worker does); "
            "the day is the short slice plus its other batches at the steady-state time of a "
            "batch (the difference of the two slices); worker_estimate_min: the day in the "
            "worker's worker_chunks chunks of worker_chunk_rows rows (whole batches but the "
            "last chunk's), each with the short slice's once-only time and its last batch padded"
            + (
                f"; the {LAB_DAY['steps'] - steps} missing steps a batch added at the measured "
                f"PGD time ({pgd_batch_s:.3f} s a batch for {steps} steps)"
                if steps != LAB_DAY["steps"]
                else ""
            )
        ),
    }


def _profile_phases(fn: Callable[[], Any], device: torch.device) -> dict[str, dict[str, float]]:
    """Wall and device milliseconds of each ``itloop.run.*`` phase over one call of ``fn``."""
    t0 = time.perf_counter()
    prof = _profiled(fn, device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    phases: dict[str, dict[str, float]] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("itloop.run."):
            entry = phases.setdefault(ev.key, {"wall_ms": 0.0, "device_ms": 0.0, "calls": 0})
            entry["wall_ms"] = max(entry["wall_ms"], ev.cpu_time_total / 1e3)
            entry["device_ms"] = max(
                entry["device_ms"], float(getattr(ev, "device_time_total", 0.0) or 0.0) / 1e3
            )
            entry["calls"] = max(entry["calls"], ev.count)
    for key, entry in sorted(phases.items(), key=lambda kv: -kv[1]["wall_ms"]):
        print(
            f"{entry['wall_ms']:9.1f} ms wall {entry['device_ms']:9.1f} ms device "
            f"{int(entry['calls']):4d}x  {key}",
            file=sys.stderr,
        )
    print(f"{wall_ms:9.1f} ms wall for the profiled run (profiler on)", file=sys.stderr)
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv`` and print its JSON; returns the exit status."""
    args = _parser().parse_args(None if argv is None else list(argv))
    defaults: dict[str, Any] = {
        "backbone": "resnet50",
        "input_hw": (224, 224),
        "batch": 512,
        "steps": 100,
        "sites": 200,
    }
    if args.quick:
        defaults = {"backbone": "tiny", "input_hw": (32, 32), "batch": 8, "steps": 3, "sites": 4}
        args.device = args.device or "cpu"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.batch < 2 or args.batch % 2:
        print(f"--batch must be even and >= 2 (rows come in sign pairs), got {args.batch}")
        return 2
    if args.lab_day_chunk_rows < 1:
        print(f"--lab-day-chunk-rows must be >= 1, got {args.lab_day_chunk_rows}")
        return 2
    fast = AttackConfig.for_device(device)  # what the worker runs on this device
    use_compile = fast.compile if args.compile is None else args.compile
    dtype = fast.autocast_dtype is not None if args.dtype is None else args.dtype == "bf16"
    triton_step = fast.triton_step if args.triton_step is None else args.triton_step
    grad = args.gradient_dtype
    bf16_gradient = fast.gradient_dtype is not None if grad is None else grad == "bf16"
    hw = (int(args.input_hw[0]), int(args.input_hw[1]))
    if cuda:
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(args.seed)
    model, source = build_model(args.backbone, args.sites, args.layer, hw)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    peak = peak_bf16_tflops(name) if cuda else None
    flop = _flop_per_image_step(model, hw, device)

    b, steps, eps = args.batch, args.steps, args.eps
    pairs = b // 2
    images = bench_images(pairs, hw, device, gen)
    sites = torch.randint(0, args.sites, (pairs,), generator=gen)
    rows = AttackRows.grid(torch.arange(pairs), sites, [eps])
    config = AttackConfig(
        steps=steps,
        batch_size=b,
        autocast_dtype=torch.bfloat16 if dtype else None,
        fold_batchnorm=args.fold_bn,
        channels_last=args.channels_last,
        compile=use_compile,
        compile_mode=args.compile_mode,
        split_first_conv=args.split_first_conv,
        stem_output_block=args.stem_output_block,
        fuse_conv_relu=args.fuse_conv_relu,
        fuse_blocks=args.fuse_blocks,
        matmul_1x1=args.matmul_1x1,
        gemm_templates=args.gemm_templates,
        projection_iterations=args.projection_iterations,
        triton_step=triton_step,
        gradient_dtype=torch.bfloat16 if bf16_gradient else None,
    )
    engine = AttackEngine(model, config)
    x = images[rows.image_index.to(device)].contiguous()
    clean = (images.contiguous(), rows.image_index)  # each image's two signs
    site = rows.site_index.to(device)
    sign = rows.sign.to(device=device, dtype=torch.float32)
    eps_rows = rows.eps_l2.to(device=device, dtype=torch.float32)
    ids = list(range(b))

    compile_error = None
    try:
        _, prep_s = _timed(lambda: engine.prepare(x), device)
        _, warm_s = _timed(
            lambda: engine.pgd(x, site, sign, eps_rows, ids, 1, steps=2, clean=clean), device
        )
    except Exception as exc:  # a compiler failure must not lose the rest of a one-shot GPU run
        if not use_compile:
            raise
        compile_error = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(f"torch.compile failed, measuring eager instead: {compile_error}", file=sys.stderr)
        use_compile = False
        config = AttackConfig(**{**config.__dict__, "compile": False})
        engine = AttackEngine(model, config)
        _, prep_s = _timed(lambda: engine.prepare(x), device)
        _, warm_s = _timed(
            lambda: engine.pgd(x, site, sign, eps_rows, ids, 1, steps=2, clean=clean), device
        )
    print(f"ours warmed up in {prep_s + warm_s:.1f} s", file=sys.stderr)
    (delta, _), ours_s = _timed(
        lambda: engine.pgd(x, site, sign, eps_rows, ids, 7, clean=clean), device
    )
    # pgd() runs `steps` forward/backward passes and one forward (scoring the last iterate).
    ours = _rate("itloop AttackEngine.pgd", b, steps, ours_s, flop, peak)
    print(
        f"ours: {ours['image_steps_per_s']} image-steps/s, {ours['tflops']} TFLOP/s",
        file=sys.stderr,
    )
    n_blocks = count_blocks(engine.prepare(x))
    ours["config"] = {
        "autocast": "bf16" if dtype else "fp32",
        "first_conv": (
            "split: exact-fp32 conv(x) once per batch + autocast conv(δ), "
            f"input channels padded to a multiple of {config.stem_channel_multiple}, "
            f"{config.stem_output_block}×{config.stem_output_block} output blocks"
            if dtype and config.split_first_conv
            else "fp32 input, autocast off"
        ),
        "cudnn_conv_fp32_precision": conv_fp32_precision(),
        "fold_batchnorm": args.fold_bn,
        "fuse_conv_relu": config.fuse_conv_relu,
        "fused_blocks": n_blocks,
        "block_backward": (
            "cuDNN graph API: dgrad with residual sum and ReLU mask as its epilogue"
            if cuda and cudnn_graphs.frontend_error() is None
            else f"composed ({cudnn_graphs.frontend_error() or 'not on CUDA'})"
        ),
        "matmul_1x1": config.matmul_1x1,
        "gemm_templates": config.gemm_templates,
        "channels_last": args.channels_last,
        "compile": use_compile,
        "compile_mode": args.compile_mode,
        "compile_error": compile_error,
        "projection": f"exact ball∩box, {config.projection_iterations} active-set updates/step",
        "step": (
            "Triton kernels over tiles of each row"
            if engine.uses_triton_step
            else "compiled torch"
            if use_compile
            else "eager torch"
        ),
        "keep_best": config.keep_best,
        "gradient_dtype": "bf16" if bf16_gradient else "fp32",
        "prepare_s": round(prep_s, 2),
        "compile_and_warmup_s": round(warm_s, 2),
    }
    if cuda and n_blocks:
        ours["config"]["dgrad_plans"] = cudnn_graphs.plans()
    if args.profile > 0:
        out_profile = _profile(
            lambda: engine.pgd(x, site, sign, eps_rows, ids, 7, steps=3, clean=clean),
            args,
            device,
        )
        ours["profile_top_kernels"] = out_profile
    f_clean = engine.predict(x, site)
    ours_change = engine.predict(x + delta, site) - f_clean
    out: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "model": describe_model(args, source, hw, "speed and relative quality"),
        "batch": b,
        "steps": steps,
        "eps_l2": eps,
        "flop_per_image_step": {
            "counted": flop,
            "estimate_resnet50_layer4.0_224": ESTIMATE_FLOP_PER_IMAGE_STEP,
        },
        "peak_bf16_dense_tflops": peak,
        "ours": ours,
    }

    quality: dict[str, Any] = {
        "rows": b,
        "pairs": pairs,
        "metric": "mean over (image, site) of max over signs |f(x+δ) − f(x)|, exact fp32",
        "ours_continuous": _best_sign_mean(ours_change),
    }
    if args.torchattacks:
        import torchattacks

        wrapped = _TwoLogit(model, site, f_clean).eval()
        labels = (rows.sign.to(device) > 0).long()
        atk = torchattacks.PGDL2(wrapped, eps=eps, alpha=eps / 3, steps=1, random_start=True)
        torch.manual_seed(args.seed)
        _, ta_warm_s = _timed(lambda: atk(x.contiguous(), labels), device)
        atk.steps = steps
        adv, ta_s = _timed(lambda: atk(x.contiguous(), labels), device)
        print(f"torchattacks: {b * steps / ta_s:.1f} image-steps/s", file=sys.stderr)
        ta = _rate(
            "torchattacks.PGDL2 on a 2-logit wrapper, fp32 eager", b, steps, ta_s, flop, peak
        )
        ta["warmup_s"] = round(ta_warm_s, 2)
        out["torchattacks"] = ta
        out["speedup_vs_torchattacks"] = round(
            ours["image_steps_per_s"] / ta["image_steps_per_s"], 2
        )
        ta_delta = adv - x
        quality["torchattacks_continuous"] = _best_sign_mean(engine.predict(adv, site) - f_clean)
        rounded = to_levels(adv)
        k_ta = rounded.to(torch.int16) - to_levels(x).to(torch.int16)
        quality["torchattacks_rounded"] = _best_sign_mean(
            engine.predict(from_levels(rounded), site) - f_clean
        )
        over = realised_eps_l2(k_ta).cpu() / eps
        quality["torchattacks_rounded_realised_eps_over_requested_max"] = round(
            float(over.max()), 4
        )
        quality["torchattacks_continuous_norm_over_eps_mean"] = round(
            float(ta_delta.flatten(1).norm(dim=1).mean() / eps), 4
        )

    def full_run() -> AttackResult:
        return engine.run(images, rows, generator=torch.Generator().manual_seed(args.seed))

    _timed(full_run, device)  # first call: cuDNN picks the fp32 scoring kernels
    result, run_s = _timed(full_run, device)
    ours["engine_run_s"] = round(run_s, 3)  # the same batch end to end: PGD, rounding, scoring
    if args.profile_run:
        out["run_phases_ms"] = _profile_phases(full_run, device)
    quality["ours_quantised"] = _best_sign_mean(result.predicted_change)
    quality["ours_quantised_realised_eps_over_requested_max"] = round(
        float((result.realised_eps_l2 / result.eps_l2).max()), 6
    )
    quality["ours_quantised_realised_eps_mean"] = round(float(result.realised_eps_l2.mean()), 6)
    if "torchattacks_continuous" in quality:
        quality["ours_over_torchattacks"] = round(
            quality["ours_continuous"] / max(quality["torchattacks_continuous"], 1e-30), 4
        )
    out["quality"] = quality

    if args.lab_day:
        out["lab_day"] = _lab_day(engine, args, hw, device, gen, pgd_batch_s=ours_s)
    out["notes"] = [
        "image-steps/s counts `steps` forward+input-backward passes per row; ours runs one "
        "forward more (to score the last iterate), not counted",
        "torchattacks uses scale-then-clip and no quantisation; its rounded stimuli can exceed ε",
    ]
    if not math.isfinite(ours["image_steps_per_s"]):
        print(json.dumps(out, indent=2, default=str))
        return 1
    emit_json(out, args.output)
    return 0


def describe_model(
    args: argparse.Namespace, source: str, hw: tuple[int, int], measured: str
) -> dict[str, Any]:
    """The benchmarked model, for a benchmark's JSON: ``measured`` is what needs no trained
    weights."""
    return {
        "source": source,
        "backbone": args.backbone,
        "layer": args.layer,
        "input_hw": list(hw),
        "sites": args.sites,
        "weights": f"random init ({measured} need no trained weights)",
    }


def emit_json(out: dict[str, Any], output: Path | None) -> None:
    """Print a benchmark's figures as JSON, and also write them to ``output`` when given."""
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if output is not None:
        output.write_text(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
