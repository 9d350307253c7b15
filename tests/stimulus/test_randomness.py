"""Philox4x32-10 matches its published answers; the per-row draws are normal, uniform and
independent of how rows are batched."""

from __future__ import annotations

import math

import pytest
import torch

from itloop.stimulus.randomness import normal_and_uniform, philox4x32, row_keys

# Random123's known-answer vectors for philox4x32-10 (tests/kat_vectors): counter, key, output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _words(values: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.int64) for v in values]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_gives_the_published_answers(
    counter: tuple[int, ...], key: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    got = philox4x32(_words(counter), _words(key))
    assert tuple(int(w) for w in got) == expected


def _philox_python(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 with Python integers (no overflow to manage): an independent reference."""
    c, k = list(counter), list(key)
    m32 = 0xFFFFFFFF
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & m32, (k[1] + 0xBB67AE85) & m32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & m32, (p0 >> 32) ^ c[3] ^ k[1], p0 & m32]
    return c


def test_philox_broadcast_over_rows_and_counters_matches_a_scalar_reference() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 2**32, (5, 2), generator=g, dtype=torch.int64)
    ctr = torch.randint(0, 2**32, (4, 1, 7), generator=g, dtype=torch.int64)
    out = philox4x32(tuple(ctr), (keys[:, :1], keys[:, 1:]))
    for row in range(5):
        for j in range(7):
            want = _philox_python([int(c[0, j]) for c in ctr], [int(k) for k in keys[row]])
            assert [int(w[row, j]) for w in out] == want


def _splitmix(base: int, row: int) -> int:
    m64 = 0xFFFFFFFFFFFFFFFF
    z = (base + 0x9E3779B97F4A7C15 * (row + 1)) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    return z ^ (z >> 31)


def test_row_keys_are_splitmix64_of_seed_and_row() -> None:
    base = 2**62 + 12345
    keys = row_keys(base, [0, 1, 999_999])
    for i, row in enumerate([0, 1, 999_999]):
        z = _splitmix(base, row)
        assert (int(keys[i, 0]), int(keys[i, 1])) == (z & 0xFFFFFFFF, z >> 32)


def _ks_normal(x: torch.Tensor) -> float:
    xs = x.double().sort().values
    n = xs.numel()
    cdf = torch.special.ndtr(xs)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(grid - cdf, cdf - (grid - 1.0 / n)).max())


def test_draws_are_standard_normal_and_uniform() -> None:
    z, _ = normal_and_uniform(row_keys(3, range(4)), 50_000)
    flat = z.flatten()
    assert abs(float(flat.mean())) < 0.01
    assert abs(float(flat.std()) - 1.0) < 0.01
    assert _ks_normal(flat) < 0.005  # 200k draws: the 1 % critical value is 0.0036
    _, u_many = normal_and_uniform(row_keys(4, range(20_000)), 1)
    us = u_many.double().sort().values
    grid = torch.arange(1, us.numel() + 1, dtype=torch.float64) / us.numel()
    assert float((grid - us).abs().max()) < 0.015
    assert float(u_many.min()) > 0.0
    assert float(u_many.max()) < 1.0


def test_rows_are_uncorrelated_and_independent_of_the_batch() -> None:
    rows = list(range(100, 116))
    z, u = normal_and_uniform(row_keys(9, rows), 40_000)
    corr = torch.corrcoef(z.double())
    off = corr - torch.eye(len(rows), dtype=torch.float64)
    assert float(off.abs().max()) < 5 / math.sqrt(40_000)
    alone, u_alone = normal_and_uniform(row_keys(9, [rows[5]]), 1_000)
    assert torch.equal(alone[0], z[5, :1_000])  # a row's draws: its key and index only
    assert float(u_alone[0]) == float(u[5])
    other_seed, _ = normal_and_uniform(row_keys(10, [rows[5]]), 1_000)
    assert not torch.equal(other_seed[0], alone[0])


def test_a_draw_count_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match=r"n must be in .* got 0"):
        normal_and_uniform(row_keys(0, [0]), 0)
