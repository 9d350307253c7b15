"""Split-half reliability on sites whose true reliability is known."""

from __future__ import annotations

import numpy as np
import pytest

from itloop.analysis.reliability import split_half_reliability


def test_spearman_brown_recovers_the_reliability_of_the_mean() -> None:
    rng = np.random.default_rng(0)
    n_images, repeats = 10000, 4
    noise_sd = np.array([0.5, 1.0, 2.0, 4.0])
    signal = rng.normal(size=(1, n_images, 1))
    data = signal + noise_sd[:, None, None] * rng.normal(size=(4, n_images, repeats))
    expected = 1 / (1 + noise_sd**2 / repeats)
    result = split_half_reliability(data, n_splits=20, seed=1)
    np.testing.assert_allclose(result.spearman_brown, expected, atol=0.03)
    np.testing.assert_allclose(result.ceiling_r, np.sqrt(expected), atol=0.03)
    mean = data.mean(axis=2)
    truth_r = [np.corrcoef(signal[0, :, 0], mean[n])[0, 1] for n in range(4)]
    np.testing.assert_allclose(result.ceiling_r, truth_r, atol=0.03)


def test_missing_repeats_and_single_repeat_images_are_handled() -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(size=(2, 300, 6)) + rng.normal(size=(1, 300, 1))
    data[:, :, 4:] = np.nan
    data[0, :100, 1:] = np.nan  # one repeat only: left out for site 0
    result = split_half_reliability(data, n_splits=5)
    assert result.n_images.tolist() == [200, 300]
    assert np.all(np.isfinite(result.spearman_brown))
    again = split_half_reliability(data, n_splits=5)
    assert np.array_equal(again.split_half_r, result.split_half_r)


@pytest.mark.parametrize(("shape", "match"), [((3, 4), "N sites, M images, R repeats")])
def test_bad_input_is_named(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_half_reliability(np.zeros(shape))
    with pytest.raises(ValueError, match="n_splits must be at least 1, got 0"):
        split_half_reliability(np.zeros((1, 3, 2)), n_splits=0)
