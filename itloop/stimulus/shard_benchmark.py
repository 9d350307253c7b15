"""``itloop bench shards``: one attack job sharded over every GPU of a host (torchrun ranks)
against the same job on one GPU, measured in the same run.

Starts ``--nproc-per-node`` ranks with ``torch.distributed.run`` (one per GPU over NCCL; gloo
processes on a CPU). Every rank builds the same model (checked by a checksum) and compiles it on
its own device. Then rank 0 runs the job alone, in a group of its own, while the others wait; then
every rank runs it, each its contiguous shard of the rows, gathered on rank 0 as
:meth:`AttackEngine.run` does. The job is rows of a lab day's layout (each image × its site × 6 ε ×
2 signs), ``--batches-per-rank`` full batches for each rank, so that the shards are whole batches.

Prints one JSON object from rank 0: the job's seconds and image-steps/s on one rank and on all,
the speed-up and its efficiency (speed-up / ranks), the time of the gather alone, and whether the
sharded result equals the one-rank result row by row.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from itloop.stimulus.attacks import AttackConfig, AttackEngine, AttackResult, AttackRows
from itloop.stimulus.benchmark import (
    LAB_DAY_EPS,
    bench_images,
    build_model,
    describe_model,
    emit_json,
)
from itloop.stimulus.images import write_png_bytes
from itloop.stimulus.pipeline import KeptStimuli, PngWriter, attack_and_store
from itloop.stimulus.quantisation import to_levels
from itloop.stimulus.sharding import gather_rows_to_first, torchrun_command

__all__ = ["main"]

_T = TypeVar("_T")

_RANK_ENV = "LOCAL_RANK"
"""Set by torchrun in each rank: its presence says this process is a rank, not the launcher."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itloop bench shards", description=__doc__)
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="ranks, one per GPU (default: every GPU of the host; 2 on a CPU)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if any")
    p.add_argument("--backbone", default=None, help="default: resnet50 (--quick: tiny)")
    p.add_argument("--layer", default=None, help="backbone layer to cut after (default: its own)")
    p.add_argument("--input-hw", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default: the device's)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 100; quick 3)")
    p.add_argument("--sites", type=int, default=None, help="sites in the readout (default 200)")
    p.add_argument(
        "--batches-per-rank",
        type=int,
        default=4,
        help="full batches in each rank's shard (default %(default)s); the job has ranks × this",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="tiny CPU config: seconds, for tests")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick and the device."""
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    defaults: dict[str, Any] = {
        "backbone": "resnet50",
        "input_hw": (224, 224),
        "steps": 100,
        "sites": 200,
    }
    if args.quick:
        defaults = {"backbone": "tiny", "input_hw": (32, 32), "batch": 8, "steps": 3, "sites": 4}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch is None:
        args.batch = AttackConfig.for_device(torch.device(args.device)).batch_size
    if args.nproc_per_node is None:
        args.nproc_per_node = torch.cuda.device_count() if args.device == "cuda" else 2
    return args


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, or None."""
    if args.nproc_per_node < 1:
        return f"--nproc-per-node must be >= 1, got {args.nproc_per_node}"
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if args.nproc_per_node > gpus:
            return (
                f"--nproc-per-node {args.nproc_per_node} needs as many GPUs; this host has {gpus}"
            )
    if args.batches_per_rank < 1:
        return f"--batches-per-rank must be >= 1, got {args.batches_per_rank}"
    if args.batch < 2 or args.batch % 2:
        return f"--batch must be even and >= 2 (rows come in sign pairs), got {args.batch}"
    return None


def _launch(argv: list[str], ranks: int) -> int:
    """Run this benchmark as ``ranks`` torchrun ranks on this host; their exit status."""
    return subprocess.call(torchrun_command(ranks, "-m", "itloop.stimulus.shard_benchmark", *argv))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, call: Callable[[], _T]) -> tuple[_T, float]:
    """``call()`` and its seconds, from an idle device to the end of the work it queued."""
    _sync(device)
    t0 = time.perf_counter()
    out = call()
    _sync(device)
    return out, time.perf_counter() - t0


def _timed_run(
    engine: AttackEngine,
    images: torch.Tensor,
    rows: AttackRows,
    seed: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> tuple[AttackResult, float]:
    generator = torch.Generator().manual_seed(seed)
    return _timed(device, lambda: engine.run(images, rows, generator=generator, group=group))


def _fingerprint(model: torch.nn.Module) -> float:
    """Sum of every parameter and buffer (float64): equal on ranks that built the same model."""
    with torch.no_grad():
        return float(sum(t.double().sum() for t in [*model.parameters(), *model.buffers()]))


def _agreement(one: AttackResult, sharded: AttackResult) -> dict[str, Any]:
    """How far the sharded job's rows are from the one-rank job's."""
    same_rows = torch.equal(one.row_index, sharded.row_index)
    if not same_rows:
        return {"same_rows": False}
    theirs = sharded.tensors()
    stimulus_equal = (one.delta_levels == sharded.delta_levels).flatten(1).all(1)
    return {
        "same_rows": True,
        "identical_fields": sorted(
            k for k, t in one.tensors().items() if torch.equal(t, theirs[k])
        ),
        "rows_with_identical_stimulus": int(stimulus_equal.sum()),
        "max_abs_f_adv_difference": float((one.f_adv - sharded.f_adv).abs().max()),
        "realised_eps_over_requested_max": round(
            float((sharded.realised_eps_l2 / sharded.eps_l2).max()), 6
        ),
    }


def _rank_main(args: argparse.Namespace) -> int:
    cuda = args.device == "cuda"
    local_rank = int(os.environ[_RANK_ENV])
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    # the one-rank run keeps the other ranks waiting at a barrier for its whole length
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        timeout=timedelta(hours=2),
        device_id=device if cuda else None,
    )
    rank, size = dist.get_rank(), dist.get_world_size()
    try:
        status = _measure(args, device, rank, size)
        dist.barrier()  # leave together: a rank that tears its group down early can abort another
    finally:
        dist.destroy_process_group()
    return status


def _measure(args: argparse.Namespace, device: torch.device, rank: int, size: int) -> int:
    hw = (int(args.input_hw[0]), int(args.input_hw[1]))
    model, source = build_model(args.backbone, args.sites, args.layer, hw)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prints: list[float] = [0.0] * size
    dist.all_gather_object(prints, _fingerprint(model))
    if len(set(prints)) != 1:
        raise RuntimeError(f"ranks built different models (parameter sums {prints})")

    n_rows = size * args.batches_per_rank * args.batch
    per_pair = len(LAB_DAY_EPS) * 2
    pairs = math.ceil(n_rows / per_pair)
    gen = torch.Generator().manual_seed(args.seed)
    images = bench_images(pairs, hw, device, gen)
    sites = torch.randint(0, args.sites, (pairs,), generator=gen)
    rows = AttackRows.grid(torch.arange(pairs), sites, LAB_DAY_EPS).take(torch.arange(n_rows))
    config = replace(AttackConfig.for_device(device, args.steps), batch_size=args.batch)
    engine = AttackEngine(model, config)
    groups = [dist.new_group([r]) for r in range(size)]  # every rank creates every group
    alone = groups[rank]  # this rank by itself
    if not isinstance(alone, dist.ProcessGroup):
        raise RuntimeError(f"rank {rank} is not in the group made of it alone")

    # compile and autotune on every rank at once, each on one batch of its own
    warm = rows.take(torch.arange(min(args.batch, n_rows)))
    _, warm_s = _timed_run(engine, images, warm, args.seed, device, alone)
    warmups: list[float] = [0.0] * size
    dist.all_gather_object(warmups, warm_s)
    # NCCL sets up the point-to-point links of the gather on first use: not part of the job's time
    gather_rows_to_first({"row": torch.zeros(1, device=device)})

    dist.barrier()
    one: AttackResult | None = None
    one_s = 0.0
    if rank == 0:
        one, one_s = _timed_run(engine, images, rows, args.seed, device, alone)
    dist.barrier()
    sharded, sharded_s = _timed_run(engine, images, rows, args.seed, device, None)
    rank_s: list[float] = [0.0] * size
    dist.all_gather_object(rank_s, sharded_s)

    # the gather alone: each rank's shard once more, as run() sent it
    shard_rows = [0] * size
    dist.all_gather_object(shard_rows, len(sharded) if rank else 0)
    mine = sharded if rank else sharded.rows(0, len(sharded) - sum(shard_rows))
    dist.barrier()
    _, gather_s = _timed(device, lambda: gather_rows_to_first(mine.tensors()))

    pipeline = _pipeline(engine, images, rows, args.seed, device, alone, rank, size)

    names: list[str] = [""] * size
    dist.all_gather_object(names, _device_name(device))
    if rank != 0:
        return 0
    assert one is not None
    shard_rows[0] = len(mine)
    speedup = one_s / sharded_s
    out = {
        "devices": names,
        "torch": torch.__version__,
        "backend": dist.get_backend(),
        "ranks": size,
        "model": describe_model(args, source, hw, "timings"),
        "batch": args.batch,
        "steps": args.steps,
        "eps_l2": list(LAB_DAY_EPS),
        "rows": n_rows,
        "rows_per_rank": shard_rows,
        "warmup_s": [round(s, 2) for s in warmups],
        "one_rank": _rate(n_rows, args.steps, one_s),
        "all_ranks": {
            **_rate(n_rows, args.steps, sharded_s),
            "rank_seconds": [round(s, 3) for s in rank_s],
            "gather_s": round(gather_s, 3),
        },
        "speedup": round(speedup, 3),
        "efficiency": round(speedup / size, 3),
        "agreement": _agreement(one, sharded),
        "pipeline": pipeline,
        "method": (
            "AttackEngine.run over the rows (random start, PGD, budget check, quantisation-aware "
            "rounding, exact-fp32 f(x) and f(x+δ)), timed from a barrier to the whole result on "
            "rank 0: first on rank 0 alone (a group of its own), then sharded over every rank and "
            "gathered on rank 0; gather_s: the gather alone, the same shards once more"
        ),
    }
    emit_json(out, args.output)
    return 0


def _timed_pipeline(
    engine: AttackEngine,
    clean_levels: torch.Tensor,
    rows: AttackRows,
    seed: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> tuple[KeptStimuli, float]:
    """attack_and_store over ``rows``, its PNGs to a directory of this rank's: stimuli and
    seconds (until every PNG is stored and, sharded, every row is on rank 0)."""
    with (
        tempfile.TemporaryDirectory(prefix="itloop-shards-") as tmp,
        PngWriter(lambda data: write_png_bytes(data, Path(tmp))[0]) as writer,
    ):
        generator = torch.Generator().manual_seed(seed)
        return _timed(
            device,
            lambda: attack_and_store(
                engine,
                clean_levels,
                rows,
                generator=generator,
                writer=writer,
                device=device,
                group=group,
            ),
        )


def _pipeline(
    engine: AttackEngine,
    images: torch.Tensor,
    rows: AttackRows,
    seed: int,
    device: torch.device,
    alone: dist.ProcessGroup,
    rank: int,
    size: int,
) -> dict[str, Any]:
    """The worker's pipeline (attack, keep the better sign, PNGs stored on CPU threads) over the
    same rows, on rank 0 alone and then on every rank: its figures (rank 0's are complete)."""
    clean_levels = to_levels(images.cpu())
    dist.barrier()
    one: KeptStimuli | None = None
    one_s = 0.0
    if rank == 0:
        one, one_s = _timed_pipeline(engine, clean_levels, rows, seed, device, alone)
    dist.barrier()
    every, every_s = _timed_pipeline(engine, clean_levels, rows, seed, device, None)
    rank_s: list[float] = [0.0] * size
    dist.all_gather_object(rank_s, every_s)
    if one is None:
        return {}
    speedup = one_s / every_s
    steps = engine.config.steps
    return {
        "what": "attack_and_store: the better sign of each (image, site, ε) kept, its PNG "
        "encoded and stored on CPU threads while the device attacks the next batch; sharded, "
        "each rank stores its own and rank 0 gets every kept row and address",
        "kept_stimuli": len(every.result),
        "one_rank": _rate(len(rows), steps, one_s),
        "all_ranks": {
            **_rate(len(rows), steps, every_s),
            "rank_seconds": [round(t, 3) for t in rank_s],
        },
        "speedup": round(speedup, 3),
        "efficiency": round(speedup / size, 3),
        "identical_addresses": one.sha256 == every.sha256,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores)"


def _rate(rows: int, steps: int, seconds: float) -> dict[str, float]:
    return {"seconds": round(seconds, 3), "image_steps_per_s": round(rows * steps / seconds, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``: launch the ranks, or be one of them."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _resolve(_parser().parse_args(raw))
    problem = _check(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    if _RANK_ENV not in os.environ:
        return _launch(raw, args.nproc_per_node)
    return _rank_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
