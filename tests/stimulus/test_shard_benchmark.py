"""`itloop bench shards --quick` shards one job over two ranks and times it against one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itloop.stimulus import AttackResult, shard_benchmark

from .multirank import NCCL, run_ranks


@pytest.mark.slow
def test_two_ranks_time_the_job_against_one_and_agree_row_by_row(tmp_path: Path) -> None:
    out_file = tmp_path / "shards.json"
    argv = [
        "--quick",
        "--nproc-per-node",
        "2",
        "--batches-per-rank",
        "3",
        "--output",
        str(out_file),
    ]
    assert shard_benchmark.main(argv) == 0
    printed = json.loads(out_file.read_text())
    assert printed["ranks"] == 2
    assert printed["backend"] == "gloo"
    assert printed["rows"] == 2 * 3 * 8
    assert printed["rows_per_rank"] == [24, 24]
    one, every = printed["one_rank"], printed["all_ranks"]
    for figures in (one, every):
        assert figures["seconds"] > 0
        rate = printed["rows"] * printed["steps"] / figures["seconds"]
        assert figures["image_steps_per_s"] == pytest.approx(rate, rel=0.02)
    assert printed["speedup"] == pytest.approx(one["seconds"] / every["seconds"], rel=0.02)
    assert printed["efficiency"] == pytest.approx(printed["speedup"] / 2, rel=0.01)
    assert len(every["rank_seconds"]) == 2
    assert every["gather_s"] >= 0
    agreement = printed["agreement"]  # one process or two: the same draws, the same stimuli
    assert agreement["same_rows"]
    assert agreement["identical_fields"] == sorted(AttackResult.__dataclass_fields__)
    assert agreement["rows_with_identical_stimulus"] == printed["rows"]
    assert agreement["realised_eps_over_requested_max"] <= 1.0
    pipeline = printed["pipeline"]  # the worker's pipeline: the same stimuli, stored by both
    assert pipeline["kept_stimuli"] == printed["rows"] // 2
    assert pipeline["identical_addresses"]
    assert pipeline["speedup"] == pytest.approx(
        pipeline["one_rank"]["seconds"] / pipeline["all_ranks"]["seconds"], rel=0.02
    )
    assert len(pipeline["all_ranks"]["rank_seconds"]) == 2


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got 0"),
        (["--batches-per-rank", "0"], "--batches-per-rank must be >= 1, got 0"),
        (["--batch", "0"], "--batch must be even and >= 2 (rows come in sign pairs), got 0"),
        (["--batch", "7"], "--batch must be even and >= 2 (rows come in sign pairs), got 7"),
    ],
)
def test_bad_arguments_are_named_before_any_rank_starts(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shard_benchmark.main(["--quick", *argv]) == 2
    assert named in capsys.readouterr().err


def test_more_ranks_than_gpus_is_refused_with_the_count(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_benchmark.torch.cuda, "device_count", lambda: 1)
    assert shard_benchmark.main(["--device", "cuda", "--nproc-per-node", "2"]) == 2
    assert "--nproc-per-node 2 needs as many GPUs; this host has 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", [NCCL])
def test_nccl_ranks_time_the_job_and_agree_row_by_row(tmp_path: Path, backend: str) -> None:
    """The benchmark's own ranks over NCCL (on GPUs, or sharing one as hosts of their own)."""
    out_file = tmp_path / "shards.json"
    argv = ["-m", "itloop.stimulus.shard_benchmark", "--quick", "--device", "cuda"]
    argv += ["--batches-per-rank", "3", "--output", str(out_file)]
    run_ranks(2, backend, argv, tmp_path / "logs", timeout_s=480)
    printed = json.loads(out_file.read_text())
    assert printed["backend"] == "nccl"
    assert printed["ranks"] == 2
    assert len(printed["devices"]) == 2
    assert all(name.startswith("cuda:") for name in printed["devices"])
    assert printed["rows"] == 2 * 3 * 8
    assert printed["rows_per_rank"] == [24, 24]
    assert printed["all_ranks"]["gather_s"] >= 0
    agreement = printed["agreement"]
    assert agreement["same_rows"]
    # rank 0's shard ran in the process that ran the whole job alone, with the same kernels
    assert agreement["rows_with_identical_stimulus"] >= 24
    assert agreement["realised_eps_over_requested_max"] <= 1.0
    assert printed["pipeline"]["kept_stimuli"] == printed["rows"] // 2
