"""Trial datasets: (image, per-site spike count) pairs read in batches, never all at once.

A trial is one presentation of one image; several trials may show the same image (repeats).
Images are stored once, trials refer to them by index, and responses carry NaN where a site was
not recorded (or a trial did not count for it). ``NpyTrialDataset`` memory-maps a directory of
.npy files, so 100k+ trials of 224×224 images stream from disk in batches.

Directory layout (``write_trials`` writes it):

- ``images.npy``     (M, 3, H, W) uint8 (0…255) or float32 in [0, 1]
- ``image_ids.npy``  (T,) int64, index into images
- ``responses.npy``  (T, N) float32 spike counts per trial and site, NaN = missing
- ``observed.npy``   optional (T, N) bool; False also marks a missing entry
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ArrayTrialDataset", "NpyTrialDataset", "TrialDataset", "write_trials"]

_CHUNK = 1024


@runtime_checkable
class TrialDataset(Protocol):
    """Random access to trials: images by image id, responses by trial index."""

    @property
    def n_trials(self) -> int: ...

    @property
    def n_sites(self) -> int: ...

    @property
    def image_hw(self) -> tuple[int, int]: ...

    @property
    def image_ids(self) -> NDArray[np.int64]:
        """(T,) image index of every trial."""
        ...

    def images(self, ids: NDArray[np.int64]) -> NDArray[np.float32]:
        """(K,) image ids -> (K, 3, H, W) RGB in [0, 1]."""
        ...

    def responses(self, trials: NDArray[np.int64]) -> NDArray[np.float32]:
        """(K,) trial indices -> (K, N) spike counts, NaN where missing."""
        ...

    def image_bytes(self, ids: NDArray[np.int64]) -> bytes:
        """The stored bytes of images ``ids`` (for fingerprints)."""
        ...


class ArrayTrialDataset:
    """A TrialDataset over arrays (in memory, or memory-mapped by NpyTrialDataset).

    images: (M, 3, H, W) uint8 or float in [0, 1]; image_ids: (T,) ints in [0, M);
    responses: (T, N) spike counts, NaN = missing; observed: optional (T, N) bool mask.
    """

    def __init__(
        self,
        images: NDArray[np.generic],
        image_ids: ArrayLike,
        responses: NDArray[np.generic],
        observed: NDArray[np.bool_] | None = None,
    ) -> None:
        ids = np.asarray(image_ids)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (M, 3, H, W), got {images.shape}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float, got dtype {images.dtype}")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"image_ids must be a (T,) integer array, got {ids.shape} {ids.dtype}")
        if responses.ndim != 2 or responses.shape[0] != ids.shape[0]:
            raise ValueError(
                f"responses must be (T, N) with T = {ids.shape[0]} trials, got {responses.shape}"
            )
        if observed is not None and observed.shape != responses.shape:
            raise ValueError(
                f"observed must be {responses.shape} like responses, got {observed.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= images.shape[0]):
            bad = int(ids[(ids < 0) | (ids >= images.shape[0])][0])
            raise ValueError(f"image id {bad} is outside the {images.shape[0]} stored images")
        self._images = images
        self._ids = ids.astype(np.int64, copy=False)
        self._responses = responses
        self._observed = observed

    @property
    def n_trials(self) -> int:
        return int(self._ids.shape[0])

    @property
    def n_sites(self) -> int:
        return int(self._responses.shape[1])

    @property
    def image_hw(self) -> tuple[int, int]:
        return (int(self._images.shape[2]), int(self._images.shape[3]))

    @property
    def image_ids(self) -> NDArray[np.int64]:
        return self._ids

    def images(self, ids: NDArray[np.int64]) -> NDArray[np.float32]:
        """(K,) image ids -> (K, 3, H, W) RGB in [0, 1]."""
        raw = np.asarray(self._images[np.asarray(ids)])
        if raw.dtype == np.uint8:
            return raw.astype(np.float32) / np.float32(255.0)
        out = raw.astype(np.float32, copy=False)
        if out.size and (float(out.min()) < 0.0 or float(out.max()) > 1.0):
            raise ValueError(
                f"float images must lie in [0, 1], got range [{out.min():.4g}, {out.max():.4g}]"
            )
        return out

    def responses(self, trials: NDArray[np.int64]) -> NDArray[np.float32]:
        """(K,) trial indices -> (K, N) spike counts, NaN where missing."""
        idx = np.asarray(trials)
        out = np.array(self._responses[idx], dtype=np.float32)
        if self._observed is not None:
            out[~np.asarray(self._observed[idx], dtype=bool)] = np.nan
        if np.isinf(out).any():
            row, col = np.argwhere(np.isinf(out))[0]
            raise ValueError(f"response of trial {int(idx[row])} site {int(col)} is infinite")
        return out

    def image_bytes(self, ids: NDArray[np.int64]) -> bytes:
        return np.ascontiguousarray(self._images[np.asarray(ids)]).tobytes()


class NpyTrialDataset(ArrayTrialDataset):
    """The directory layout of this module, memory-mapped read-only."""

    def __init__(self, directory: str | Path) -> None:
        folder = Path(directory)
        names = ("images.npy", "image_ids.npy", "responses.npy")
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"trial directory {folder} lacks {name}")
        observed_path = folder / "observed.npy"
        observed = np.load(observed_path, mmap_mode="r") if observed_path.is_file() else None
        super().__init__(
            np.load(folder / "images.npy", mmap_mode="r"),
            np.load(folder / "image_ids.npy"),
            np.load(folder / "responses.npy", mmap_mode="r"),
            observed,
        )
        self.directory = folder


def write_trials(
    directory: str | Path,
    images: NDArray[np.generic],
    image_ids: ArrayLike,
    responses: NDArray[np.generic],
    observed: NDArray[np.bool_] | None = None,
) -> NpyTrialDataset:
    """Write the layout of this module into ``directory`` in chunks and open it memory-mapped."""
    ArrayTrialDataset(images, image_ids, responses, observed)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if images.dtype == np.uint8 else np.float32
    arrays: list[tuple[str, NDArray[np.generic], type[np.generic]]] = [
        ("images.npy", images, dtype),
        ("responses.npy", responses, np.float32),
    ]
    if observed is not None:
        arrays.append(("observed.npy", observed, np.bool_))
    for name, source, kind in arrays:
        target = np.lib.format.open_memmap(  # type: ignore[no-untyped-call]
            folder / name, mode="w+", dtype=kind, shape=source.shape
        )
        for start in range(0, source.shape[0], _CHUNK):
            target[start : start + _CHUNK] = source[start : start + _CHUNK]
        target.flush()
        del target
    np.save(folder / "image_ids.npy", np.asarray(image_ids, dtype=np.int64))
    return NpyTrialDataset(folder)
