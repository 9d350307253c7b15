"""Sampling clean images from an ImageNet-style folder: spread over classes, never reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itloop.stimulus.sources import ImageFolderSource, SourceError


def _folder(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (root / f"n{c:04d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((8, 8, 3), (c * 20 + i) % 256, np.uint8)
            Image.fromarray(pixels).save(root / f"n{c:04d}" / f"img{i}.png")
    (root / "n0000" / "notes.txt").write_text("not an image")
    return root


def test_sample_spreads_over_classes_and_excludes_shown(tmp_path: Path) -> None:
    source = ImageFolderSource(_folder(tmp_path / "src", classes=5, per_class=4))
    assert len(source.images) == 20
    assert source.classes == [f"n{c:04d}" for c in range(5)]
    first = source.sample(5, seed=1)
    assert len({i.class_label for i in first}) == 5
    assert source.sample(5, seed=1) == first
    second = source.sample(15, exclude=[i.relative_path for i in first], seed=2)
    assert {i.relative_path for i in first}.isdisjoint(i.relative_path for i in second)
    assert len({i.relative_path for i in second}) == 15


def test_running_out_of_unused_images_names_the_numbers(tmp_path: Path) -> None:
    source = ImageFolderSource(_folder(tmp_path / "src", classes=2, per_class=2))
    shown = [i.relative_path for i in source.images[:3]]
    with pytest.raises(SourceError, match=r"1 unused images .* 3 already shown.*2 are needed"):
        source.sample(2, exclude=shown, seed=0)


def test_partner_is_of_another_class(tmp_path: Path) -> None:
    source = ImageFolderSource(_folder(tmp_path / "src", classes=3, per_class=2))
    for image in source.images:
        assert source.partner_for(image, seed=3).class_label != image.class_label


def test_empty_or_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="is not a folder"):
        ImageFolderSource(tmp_path / "nowhere")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images in class subfolders"):
        ImageFolderSource(tmp_path / "empty")
