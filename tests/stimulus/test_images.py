"""Stimulus PNGs round-trip exactly and are addressed by their sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from itloop.stimulus import decode_png, encode_png, load_image, read_png, sha256_hex, write_png


def _levels(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 17, 23), generator=g, dtype=torch.uint8)


def test_png_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    lv = _levels(0)
    data = encode_png(lv)
    assert data == encode_png(lv.clone())
    assert torch.equal(decode_png(data), lv)
    digest, path = write_png(lv, tmp_path)
    assert path == tmp_path / f"{digest}.png"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_hex(data)
    assert torch.equal(read_png(path), lv)
    assert write_png(lv, tmp_path) == (digest, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_load_image_gives_float_rgb_on_the_8bit_grid(tmp_path: Path) -> None:
    lv = _levels(1)
    Image.fromarray(lv.permute(1, 2, 0).numpy()).convert("L").save(tmp_path / "grey.png")
    x = load_image(tmp_path / "grey.png")
    assert x.shape == (3, 17, 23)
    assert x.dtype == torch.float32
    assert torch.equal(torch.round(x * 255) / 255, x)
    assert torch.equal(x[0], x[1])
    assert load_image(tmp_path / "grey.png", size_hw=(8, 10)).shape == (3, 8, 10)


def test_wrong_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(torch.zeros(3, 4, 4))
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="JPEG"):
        decode_png((tmp_path / "a.jpg").read_bytes())
