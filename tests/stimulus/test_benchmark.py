"""`itloop bench attack --quick` runs on a CPU and prints JSON with ours and torchattacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itloop.stimulus import benchmark


@pytest.mark.slow
def test_quick_benchmark_prints_valid_json_with_both_attacks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "bench.json"
    assert benchmark.main(["--quick", "--output", str(out_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_file.read_text())
    assert printed["batch"] == 8
    assert printed["steps"] == 3
    for who in ("ours", "torchattacks"):
        assert printed[who]["image_steps_per_s"] > 0
        assert printed[who]["tflops"] > 0
    assert printed["speedup_vs_torchattacks"] > 0
    q = printed["quality"]
    assert q["ours_continuous"] > 0
    assert q["torchattacks_continuous"] > 0
    assert q["ours_quantised_realised_eps_over_requested_max"] <= 1.0
    assert printed["lab_day"]["rows"] == 200 * 42 * 6 * 2
    day = printed["lab_day"]
    assert day["estimate_s"] > 0
    short, long = day["measured_slices"]
    assert long["batches"] == short["batches"] + 3
    assert long["kept_stimuli"] == long["rows"] // 2  # one sign of each (image, site, ε)
    assert long["pngs_stored"] == long["kept_stimuli"] + long["rows"] // 12  # and the clean ones
    assert day["estimate_s"] >= short["wall_s"]
    assert day["worker_chunk_rows"] % 8 == 0  # whole batches of the quick run's 8 rows
    assert day["worker_chunks"] == -(-day["rows"] // day["worker_chunk_rows"])
    assert day["worker_estimate_min"] > 0
    assert printed["flop_per_image_step"]["counted"] > 0
    config = printed["ours"]["config"]  # a CPU's defaults: the fp32 gradient, torch's step
    assert config["gradient_dtype"] == "fp32"
    assert config["step"] == "eager torch"


def test_a_bf16_gradient_run_reports_its_dtype_and_keeps_the_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--quick", "--gradient-dtype", "bf16", "--no-torchattacks", "--no-lab-day"]
    assert benchmark.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ours"]["config"]["gradient_dtype"] == "bf16"
    assert printed["ours"]["image_steps_per_s"] > 0
    assert printed["quality"]["ours_continuous"] > 0
    assert printed["quality"]["ours_quantised_realised_eps_over_requested_max"] <= 1.0


def test_profile_on_a_cpu_ranks_the_ops_and_names_their_callers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--profile`` on a CPU device ranks the ATen ops (and the regions around them) by their
    own time over 3 steps, each with the op or region that called it, instead of asking for
    CUDA; ``--profile-run`` times a run's phases on the same device."""
    argv = ["--quick", "--device", "cpu", "--profile", "6", "--profile-run"]
    assert benchmark.main([*argv, "--no-torchattacks", "--no-lab-day"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # --profile-run: where one AttackEngine.run's time goes, PGD among its phases
    assert printed["run_phases_ms"]["itloop.run.pgd"]["wall_ms"] > 0
    rows = printed["ours"]["profile_top_kernels"]
    assert len(rows) == 6
    assert any(r["kernel"].startswith("aten::") for r in rows)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    assert rows[-1]["ms"] > 0
    assert all(r["calls"] >= 1 for r in rows)
    # every step's work runs inside the engine's named regions, so some caller names one
    assert any("itloop.run." in (r["launched_by"] or "") for r in rows)


def test_lab_day_extrapolation_separates_the_once_only_time() -> None:
    """Slices of 2 and 5 batches taking 11 and 26 s: 5 s a batch, 1 s once per run. The day has
    100,800 rows, 197 batches of 512 as one run; in the worker's chunks of about 4,096 rows it runs
    21 chunks of 384 pairs (4,608 rows, 9 batches) and one of 336 (4,032 rows, 8 batches, the
    last padded), each with its once-only second."""
    short = {"wall_s": 11.0, "batches": 2}
    long = {"wall_s": 26.0, "batches": 5}
    day = benchmark._extrapolate_day(short, long, 512, 0.0, 4096)
    assert day["per_batch_s"] == pytest.approx(5.0)
    assert day["one_run_s"] == pytest.approx(1.0 + 197 * 5.0)
    assert day["worker_s"] == pytest.approx(21 * (1.0 + 9 * 5.0) + (1.0 + 8 * 5.0))
    assert (day["worker_chunks"], day["worker_chunk_rows"]) == (22, 4608)
    more_steps = benchmark._extrapolate_day(short, long, 512, 2.0, 200 * 512)
    assert more_steps["one_run_s"] == pytest.approx(1.0 + 197 * 7.0)
    assert more_steps["worker_s"] == pytest.approx(more_steps["one_run_s"])


def test_lab_day_chunks_are_the_workers() -> None:
    from itloop.server.settings import Settings

    worker = Settings.model_fields["generation_chunk_rows"].default
    assert benchmark._parser().parse_args([]).lab_day_chunk_rows == worker


def test_peak_table_matches_device_names() -> None:
    assert benchmark.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert benchmark.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert benchmark.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert benchmark.peak_bf16_tflops("cpu (2 cores)") is None


def test_bad_batch_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmark.main(["--quick", "--batch", "7"]) == 2
    assert "--batch" in capsys.readouterr().out
    assert benchmark.main(["--quick", "--lab-day-chunk-rows", "0"]) == 2
    assert "--lab-day-chunk-rows must be >= 1, got 0" in capsys.readouterr().out


def test_each_profiled_kernel_names_the_op_that_launched_most_of_its_time() -> None:
    """Profiler events of a convolution's backward that copies its gradient before the data-gradient
    kernel, and a copy of another size elsewhere: each kernel is attributed to the launch site
    (op, first input's shape, enclosing ops) that took most of its device time."""
    from torch.autograd.profiler_util import FunctionEvent

    def op(i: int, name: str, parent: FunctionEvent | None, shape: list[int] | None = None):
        ev = FunctionEvent(i, name, 0, 10 * i, 10 * i + 5, input_shapes=[shape] if shape else [])
        if parent is not None:
            ev.set_cpu_parent(parent)
        return ev

    region = op(1, "itloop.run.pgd", None)
    backward = op(2, "aten::convolution_backward", region, [512, 256, 56, 56])
    contiguous = op(3, "aten::contiguous", backward, [512, 256, 56, 56])
    copy = op(4, "aten::copy_", contiguous, [512, 256, 56, 56])
    copy.append_kernel("direct_copy_kernel_cuda", 0, 1150.0)
    backward.append_kernel("sm90_xmma_dgrad", 0, 1170.0)
    small = op(5, "aten::copy_", region, [512, 3, 224, 224])
    small.append_kernel("direct_copy_kernel_cuda", 0, 200.0)
    small.append_kernel("direct_copy_kernel_cuda", 0, 200.0)

    got = benchmark.kernel_launchers([region, backward, contiguous, copy, small])
    assert got["direct_copy_kernel_cuda"] == (
        "aten::copy_ [512, 256, 56, 56] < aten::contiguous < aten::convolution_backward"
        " < itloop.run.pgd"
    )
    assert (
        got["sm90_xmma_dgrad"] == "aten::convolution_backward [512, 256, 56, 56] < itloop.run.pgd"
    )
    # three small copies outweigh the one large copy: the launch site with most time wins
    small.append_kernel("direct_copy_kernel_cuda", 0, 800.0)
    assert benchmark.kernel_launchers([copy, small])["direct_copy_kernel_cuda"] == (
        "aten::copy_ [512, 3, 224, 224] < itloop.run.pgd"
    )


def test_profile_rows_leave_out_the_regions_the_device_timeline_repeats() -> None:
    """A compiled graph's call shows on the device timeline as a user annotation spanning its
    kernels; counted as a row it would add their time again. Only the kernels are ranked, most
    time first, each with its launch site."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent, FunctionEventAvg

    def on_device(i: int, name: str, start: int, end: int, *, annotation: bool = False):
        return FunctionEvent(
            i,
            name,
            0,
            start,
            end,
            use_device="cuda",
            device_type=DeviceType.CUDA,
            is_user_annotation=annotation,
        )

    graph = on_device(1, "## Call CompiledFxGraph abc ##", 0, 900, annotation=True)
    dgrad = [on_device(2, "convBwdData", 0, 500), on_device(3, "convBwdData", 500, 800)]
    copy = on_device(4, "direct_copy_kernel_cuda", 800, 900)
    averages = []
    for evs in ([graph], dgrad, [copy]):
        avg = FunctionEventAvg()
        for ev in evs:
            avg.add(ev)
        averages.append(avg)

    rows = benchmark.kernel_rows(averages, {"convBwdData": "itloop::dgrad_epilogue"}, cuda=True)
    assert [(r["kernel"], r["calls"], r["ms"]) for r in rows] == [
        ("convBwdData", 2, 0.8),
        ("direct_copy_kernel_cuda", 1, 0.1),
    ]
    assert rows[0]["launched_by"] == "itloop::dgrad_epilogue"
    assert rows[1]["launched_by"] is None
