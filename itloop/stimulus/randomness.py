"""Counter-based random draws: each row's numbers depend only on (seed, row), never on batching.

A random start must not change when the rows of a job are batched or sharded differently, so each
row's draws come from its own key. Seeding a generator per row costs a host round of seeding and
two kernel launches per row (hundreds of milliseconds a batch on a GPU, with the device idle).
Here every row's draws come from one vectorised evaluation of Philox4x32-10 (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011), a counter-based generator: each output
block is a keyed bijection of its counter. Keys are SplitMix64 of (seed, row); counters index the
draws. The integer arithmetic is exact on every device (32-bit words held in int64, products split
into 16-bit halves so nothing overflows), so CPU and GPU draw the same words; compiled, the whole
batch is one kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["normal_and_uniform", "philox4x32", "row_keys"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit product of constant a and b's 32-bit words."""
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    mid = ah * bl + al * bh  # < 2^33
    low_full = al * bl + ((mid & 0xFFFF) << 16)  # < 2^33
    high = (ah * bh + (mid >> 16) + (low_full >> 32)) & _MASK32
    return high, low_full & _MASK32


def philox4x32(
    counter: Sequence[Tensor], key: Sequence[Tensor], rounds: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` of four counter words and two key words (int64 tensors holding
    values in [0, 2^32), broadcast together) -> four output words, int64 in [0, 2^32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def row_keys(base_seed: int, rows: Sequence[int] | Tensor) -> Tensor:
    """(B, 2) int64 key words of each row: SplitMix64 of (base_seed, row), split in two halves."""
    r = np.asarray(rows, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        z = np.uint64(base_seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15) * (
            r + np.uint64(1)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    words = np.stack([z & np.uint64(_MASK32), z >> np.uint64(32)], axis=1).astype(np.int64)
    return torch.from_numpy(words)


def _unit(word: Tensor) -> Tensor:
    """32-bit words -> float32 uniforms in (0, 1) (the top 24 bits, centred in their cell)."""
    return ((word >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def normal_and_uniform(keys: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(B, 2) row keys -> ((B, n) float32 N(0, 1), (B,) float32 U(0, 1)), each row from its key.

    Draw j of a row comes from counter (⌊j/4⌋, 0, 0, 0) by Box–Muller on two of its words; the
    uniform is from counter (0, 1, 0, 0), so it is independent of the normals.
    """
    if n < 1 or n > 4 * _MASK32:
        raise ValueError(f"n must be in [1, 2^34), got {n}")
    k0, k1 = keys[:, :1], keys[:, 1:]
    m = -(-n // 4)
    j = torch.arange(m, device=keys.device, dtype=torch.int64).unsqueeze(0)
    zero = torch.zeros_like(j)
    w0, w1, w2, w3 = philox4x32((j, zero, zero, zero), (k0, k1))
    r_a = torch.sqrt(-2.0 * torch.log(_unit(w0)))
    r_b = torch.sqrt(-2.0 * torch.log(_unit(w2)))
    t_a = (2.0 * math.pi) * _unit(w1)
    t_b = (2.0 * math.pi) * _unit(w3)
    normals = torch.stack(
        [r_a * torch.cos(t_a), r_a * torch.sin(t_a), r_b * torch.cos(t_b), r_b * torch.sin(t_b)],
        dim=2,
    ).reshape(keys.shape[0], 4 * m)[:, :n]
    one = torch.ones(1, 1, device=keys.device, dtype=torch.int64)
    zero1 = torch.zeros_like(one)
    u = _unit(philox4x32((zero1, one, zero1, zero1), (k0, k1))[0]).squeeze(1)
    return normals, u
