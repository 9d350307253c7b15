"""The projected step's Triton kernels, run by Triton's interpreter on the CPU.

Triton builds its own library functions (``tl.sum``) for the interpreter only when
``TRITON_INTERPRET=1`` is set before it is imported, so ``test_fused_step.py`` runs this file in
a process of its own with that setting.
"""

from __future__ import annotations

import os

import pytest
import torch

from itloop.stimulus import attacks, fused_step  # after TRITON_INTERPRET is set

from .toys import step_case

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under TRITON_INTERPRET=1 only"
)


@pytest.fixture(autouse=True)
def _tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_step, "BLOCK", 1024)  # several tiles a row, the last one partial


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("keep_best", [True, False])
def test_the_tiled_step_is_the_step(iterations: int, keep_best: bool) -> None:
    case = step_case(8, (3, 24, 40))  # 2,880 values a row: 3 tiles of 1,024
    want = attacks._pgd_step(**{**case, "best_delta": case["best_delta"].clone()},
                             iterations=iterations, keep_best=keep_best)  # fmt: skip
    buffer = case["best_delta"].clone()
    got = fused_step.pgd_step(**{**case, "best_delta": buffer},
                              iterations=iterations, keep_best=keep_best)  # fmt: skip
    new, z, obj, val, best = got
    torch.testing.assert_close(new, want[0], rtol=0, atol=2e-7)
    torch.testing.assert_close(z, case["x"] + new, rtol=0, atol=0)
    torch.testing.assert_close(obj, want[2], rtol=0, atol=0)
    torch.testing.assert_close(val, want[3], rtol=0, atol=0)
    assert best is buffer  # updated in place, and only where the iterate is better
    torch.testing.assert_close(best, want[4], rtol=0, atol=0)
    norms = new.double().flatten(1).norm(dim=1)
    assert bool((norms <= case["eps"].double() * (1 + 1e-6)).all())
    assert float(z.min()) >= 0.0
    assert float(z.max()) <= 1.0
    # the branches the case is built for were taken
    assert float((new[2] - case["delta"][2]).abs().max()) < 1e-6  # no gradient: δ stays
    assert float(norms[1]) < float(case["eps"][1]) * 0.999  # the small step fits whole
    if keep_best:
        improved = case["sign"] * case["val"] > case["best_obj"]
        assert 0 < int(improved.sum()) < improved.numel()


def test_bad_operands_are_named() -> None:
    case = step_case(4, (3, 8, 8))
    with pytest.raises(ValueError, match="delta must be contiguous"):
        fused_step.pgd_step(**{**case, "delta": case["delta"].transpose(2, 3)},
                            iterations=1, keep_best=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"delta must be one of .*float32.*, got torch.float64"):
        fused_step.pgd_step(**{**case, "delta": case["delta"].double()},
                            iterations=1, keep_best=True)  # fmt: skip
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        fused_step.pgd_step(**case, iterations=0, keep_best=True)


def test_a_bf16_gradient_is_read_as_its_fp32_values() -> None:
    case = step_case(4, (3, 16, 40))
    grad = case["grad"].bfloat16()
    as_fp32 = {**case, "grad": grad.float(), "best_delta": case["best_delta"].clone()}
    want = attacks._pgd_step(**as_fp32, iterations=2, keep_best=True)
    got = fused_step.pgd_step(**{**case, "grad": grad}, iterations=2, keep_best=True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-7)


def test_a_channels_last_gradient_is_read_in_the_images_order() -> None:
    """A plain channels_last first convolution hands back its input gradient channels_last."""
    case = step_case(4, (3, 16, 40))
    grad = case["grad"].contiguous(memory_format=torch.channels_last)
    assert not grad.is_contiguous()
    want = attacks._pgd_step(**{**case, "best_delta": case["best_delta"].clone()},
                             iterations=2, keep_best=True)  # fmt: skip
    got = fused_step.pgd_step(**{**case, "grad": grad}, iterations=2, keep_best=True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-7)
    torch.testing.assert_close(got[1], case["x"] + got[0], rtol=0, atol=0)
