"""Trial datasets: the memory-mapped layout round-trips and bad arrays are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itloop.models import ArrayTrialDataset, NpyTrialDataset, TrialDataset, write_trials


def _arrays(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(10, 3, 8, 8), dtype=np.uint8)
    image_ids = np.repeat(np.arange(10), 3)
    responses = rng.poisson(4.0, size=(30, 5)).astype(np.float32)
    observed = rng.random((30, 5)) > 0.2
    return images, image_ids, responses, observed


def test_written_trials_read_back_memory_mapped(tmp_path: Path) -> None:
    images, image_ids, responses, observed = _arrays(np.random.default_rng(0))
    responses[0, 0] = np.nan
    dataset = write_trials(tmp_path / "trials", images, image_ids, responses, observed)
    assert isinstance(dataset, TrialDataset)
    reopened = NpyTrialDataset(tmp_path / "trials")
    assert isinstance(reopened._images, np.memmap)
    assert isinstance(reopened._responses, np.memmap)
    assert (reopened.n_trials, reopened.n_sites, reopened.image_hw) == (30, 5, (8, 8))
    ids = np.array([7, 2, 7])
    np.testing.assert_array_equal(reopened.images(ids), images[ids].astype(np.float32) / 255)
    trials = np.array([0, 29, 4])
    expected = np.where(observed[trials], responses[trials], np.nan)
    expected[0, 0] = np.nan
    np.testing.assert_array_equal(reopened.responses(trials), expected)
    assert reopened.image_bytes(ids) == images[ids].tobytes()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: (a[0][:, :1], *a[1:]), r"images must be \(M, 3, H, W\)"),
        (lambda a: (a[0], a[1] + 5, *a[2:]), "image id 10 is outside the 10 stored images"),
        (lambda a: (a[0], a[1], a[2][:-1], a[3]), r"T = 30 trials, got \(29, 5\)"),
        (lambda a: (*a[:3], a[3][:, :2]), r"observed must be \(30, 5\)"),
    ],
)
def test_bad_arrays_are_named(change: object, match: str) -> None:
    arrays = _arrays(np.random.default_rng(1))
    with pytest.raises(ValueError, match=match):
        ArrayTrialDataset(*change(arrays))  # type: ignore[operator]


def test_float_images_outside_the_unit_range_are_refused() -> None:
    images, image_ids, responses, _ = _arrays(np.random.default_rng(2))
    dataset = ArrayTrialDataset(images.astype(np.float32), image_ids, responses)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got range \["):
        dataset.images(np.array([0, 1]))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"lacks images\.npy"):
        NpyTrialDataset(tmp_path)
