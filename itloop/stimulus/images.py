"""Image I/O for stimuli: 8-bit RGB PNG, exact round-trip, sha256 content addresses."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "decode_png",
    "encode_png",
    "load_image",
    "read_png",
    "sha256_hex",
    "write_png",
    "write_png_bytes",
]

PNG_COMPRESS_LEVEL = 1
"""zlib level for stimuli: lossless at any level; 1 writes ~4× faster than 6 for ~10 % more bytes.
"""


def load_image(path: Path, *, size_hw: tuple[int, int] | None = None) -> Tensor:
    """Any PIL-readable image file -> (3, H, W) float32 RGB in [0, 1], on the 8-bit grid.

    size_hw resizes (bicubic) before conversion; None keeps the file's size.
    """
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if size_hw is not None:
            rgb = rgb.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
        arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _check_levels(levels: Tensor) -> np.ndarray:
    if levels.dtype != torch.uint8 or levels.ndim != 3 or levels.shape[0] != 3:
        raise ValueError(
            f"expected (3, H, W) uint8 levels, got {tuple(levels.shape)} {levels.dtype}"
        )
    return np.ascontiguousarray(levels.detach().cpu().permute(1, 2, 0).numpy())


def encode_png(levels: Tensor) -> bytes:
    """(3, H, W) uint8 levels -> lossless PNG bytes (deterministic: no metadata, fixed level)."""
    buf = io.BytesIO()
    Image.fromarray(_check_levels(levels)).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buf.getvalue()


def decode_png(data: bytes) -> Tensor:
    """PNG bytes -> (3, H, W) uint8 levels."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"expected PNG data, got {img.format!r}")
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def sha256_hex(data: bytes) -> str:
    """Bytes -> their sha256 as 64 lowercase hex digits (the content address)."""
    return hashlib.sha256(data).hexdigest()


def write_png(levels: Tensor, directory: Path) -> tuple[str, Path]:
    """(3, H, W) uint8 levels -> (sha256, path) of ``directory/<sha256>.png``, atomically."""
    return write_png_bytes(encode_png(levels), directory)


def write_png_bytes(data: bytes, directory: Path) -> tuple[str, Path]:
    """PNG bytes -> (sha256, path) of ``directory/<sha256>.png``: written to a temporary file,
    synced to disk, then renamed (idempotent: an existing file is kept)."""
    digest = sha256_hex(data)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{digest}.png"
    if not path.exists():
        tmp = directory / f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    return digest, path


def read_png(path: Path) -> Tensor:
    """A PNG file -> (3, H, W) uint8 levels."""
    return decode_png(path.read_bytes())
