"""The estimator on constructed sites whose true sensitivity is known."""

from __future__ import annotations

import numpy as np
import pytest

from itloop.analysis.sensitivity import clean_sigma, sign_corrected_lower_bound, stimulus_means


def _site(true_delta: np.ndarray, noise_sd: float, repeats: int, rng: np.random.Generator):
    """Mean responses over repeats for clean and perturbed images of a site."""
    base = rng.normal(20, 5, true_delta.size)
    clean = base[:, None] + rng.normal(0, noise_sd, (true_delta.size, repeats))
    perturbed = (base + true_delta)[:, None] + rng.normal(0, noise_sd, (true_delta.size, repeats))
    return base, clean.mean(axis=1), perturbed.mean(axis=1)


def test_right_signs_recover_the_true_mean_absolute_change() -> None:
    rng = np.random.default_rng(1)
    true_delta = rng.choice([-1, 1], 4000) * rng.uniform(2, 4, 4000)
    base, rc, rp = _site(true_delta, noise_sd=3.0, repeats=2, rng=rng)
    sigma = clean_sigma(base)
    est = sign_corrected_lower_bound(rc, rp, base, base + true_delta, sigma=sigma, n_boot=500)
    truth = np.abs(true_delta).mean()
    assert est.lower_bound == pytest.approx(truth, rel=0.05)
    assert est.ci_low * sigma < truth < est.ci_high * sigma


def test_noise_biases_the_naive_estimate_but_not_the_corrected_one() -> None:
    rng = np.random.default_rng(2)
    true_delta = np.zeros(4000)  # the perturbation does nothing
    base, rc, rp = _site(true_delta, noise_sd=3.0, repeats=2, rng=rng)
    model_guess = rng.normal(0, 1, 4000)  # a model's signs, unrelated to noise
    est = sign_corrected_lower_bound(rc, rp, base, base + model_guess, sigma=clean_sigma(base))
    assert est.naive_abs > 2.0  # ≈ 3·√(2/2)·√(2/π) ≈ 2.4 spikes of pure noise
    assert abs(est.lower_bound) < 0.15
    assert est.ci_low < 0 < est.ci_high


def test_wrong_signs_give_a_bound_below_the_truth() -> None:
    rng = np.random.default_rng(3)
    true_delta = rng.choice([-1, 1], 3000) * 3.0
    base, rc, rp = _site(true_delta, noise_sd=1.0, repeats=2, rng=rng)
    flip = rng.random(3000) < 0.3  # the model is wrong about 30 % of directions
    predicted = np.where(flip, -true_delta, true_delta)
    est = sign_corrected_lower_bound(rc, rp, base, base + predicted, sigma=1.0)
    assert est.lower_bound == pytest.approx(3.0 * (0.7 - 0.3), abs=0.15)
    assert est.lower_bound < np.abs(true_delta).mean()


def test_normalisation_and_reproducible_interval() -> None:
    rc, rp = np.array([10.0, 12, 9, 15]), np.array([8.0, 15, 9, 11])
    fc, fp = np.array([1.0, 1, 1, 1]), np.array([0.0, 2, 0, 0])
    a = sign_corrected_lower_bound(rc, rp, fc, fp, sigma=2.0, seed=7)
    b = sign_corrected_lower_bound(rc, rp, fc, fp, sigma=2.0, seed=7)
    assert a == b
    assert a.lower_bound == pytest.approx((2 + 3 + 0 + 4) / 4)
    assert a.lower_bound_normalised == pytest.approx(a.lower_bound / 2)
    assert a.ci_low <= a.lower_bound_normalised <= a.ci_high


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r_clean": [1.0, float("nan")]}, r"r_clean\[1\] is nan"),
        ({"f_perturbed": [1.0]}, "differ in length"),
        ({"sigma": 0.0}, "sigma 0.0"),
    ],
)
def test_bad_input_names_the_value(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "r_clean": [1.0, 2.0],
        "r_perturbed": [1.0, 2.0],
        "f_clean": [1.0, 2.0],
        "f_perturbed": [0.0, 1.0],
        "sigma": 1.0,
    }
    args.update(kwargs)
    sigma = args.pop("sigma")
    with pytest.raises(ValueError, match=message):
        sign_corrected_lower_bound(**args, sigma=sigma)  # type: ignore[arg-type]


def test_stimulus_means_and_sigma() -> None:
    means = stimulus_means([3, 1, 3, 1, 2], [4, 1, 6, 3, 5])
    assert means == {1: 2.0, 2: 5.0, 3: 5.0}
    assert clean_sigma([1.0, 3.0]) == pytest.approx(np.sqrt(2))
    with pytest.raises(ValueError, match="at least 2"):
        clean_sigma([1.0])
