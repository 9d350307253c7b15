"""Stimulus PNGs round-trip exactly and are addressed by their sha256."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
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


def test_png_is_standard_rgb_with_up_filtered_scanlines() -> None:
    """The encoder writes the PNG format itself: PIL reads it back exactly, every scanline is
    Up-filtered, and a smooth image compresses well below its raw size."""
    ramp = torch.arange(40 * 30, dtype=torch.int64).view(1, 40, 30) // 7
    smooth = (ramp + torch.tensor([0, 40, 90]).view(3, 1, 1)).clamp(0, 255).to(torch.uint8)
    for lv in (smooth, _levels(2), _levels(3)[:, :1]):
        data = encode_png(lv.numpy())
        assert data == encode_png(lv)
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (lv.shape[2], lv.shape[1]))
            assert np.array_equal(np.asarray(img).transpose(2, 0, 1), lv.numpy())
        kind = data[12:16]
        assert kind == b"IHDR"
        pos, idat = 8, b""
        while pos < len(data):
            (n,) = struct.unpack(">I", data[pos : pos + 4])
            if data[pos + 4 : pos + 8] == b"IDAT":
                idat += data[pos + 8 : pos + 8 + n]
            pos += 12 + n
        raw = zlib.decompress(idat)
        stride = 3 * lv.shape[2] + 1
        assert len(raw) == stride * lv.shape[1]
        assert set(raw[::stride]) == {2}
    assert len(encode_png(smooth)) < smooth.numel() / 4
