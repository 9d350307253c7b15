"""The loop's settings per device (the worker's and the benchmark's): the measured fast path on
CUDA, plain fp32 on a CPU."""

from __future__ import annotations

import torch

from itloop.stimulus.attacks import AttackConfig


def test_cuda_takes_the_tiled_step_and_the_bf16_gradient() -> None:
    config = AttackConfig.for_device(torch.device("cuda"), 100)
    assert config.steps == 100
    assert config.batch_size == 512
    assert config.compile
    assert config.channels_last
    assert config.autocast_dtype == torch.bfloat16
    assert config.triton_step
    assert config.gradient_dtype == torch.bfloat16


def test_a_cpu_keeps_fp32_throughout() -> None:
    config = AttackConfig.for_device(torch.device("cpu"), 7)
    assert config.steps == 7
    assert config.batch_size == 32
    assert not config.compile
    assert config.autocast_dtype is None
    assert not config.triton_step
    assert config.gradient_dtype is None
