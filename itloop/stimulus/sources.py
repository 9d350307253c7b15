"""Clean-image sources: an ImageNet-style folder of class subfolders, sampled without reuse."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageFolderSource", "SourceError", "SourceImage"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class SourceError(ValueError):
    """The image source cannot give what was asked; the message names the folder and numbers."""


@dataclass(frozen=True)
class SourceImage:
    """One source file: ``relative_path`` (POSIX, from the source root) identifies it for reuse."""

    path: Path
    relative_path: str
    class_label: str


class ImageFolderSource:
    """``root/<class>/<image>`` files, listed in a stable (sorted) order."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"image source {str(self.root)!r} is not a folder")
        images: list[SourceImage] = []
        for class_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for file in sorted(class_dir.iterdir()):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    rel = file.relative_to(self.root).as_posix()
                    images.append(SourceImage(file, rel, class_dir.name))
        if not images:
            raise SourceError(
                f"image source {str(self.root)!r} has no images in class subfolders "
                f"(expected {self.root}/<class>/<image>{{{', '.join(sorted(IMAGE_SUFFIXES))}}})"
            )
        self.images: tuple[SourceImage, ...] = tuple(images)

    @property
    def classes(self) -> list[str]:
        return sorted({image.class_label for image in self.images})

    def sample(
        self, n: int, *, exclude: Collection[str] = (), seed: int, spread_classes: bool = True
    ) -> list[SourceImage]:
        """``n`` distinct images not in ``exclude`` (relative paths), spread over the classes.

        With ``spread_classes`` the images are drawn round-robin over shuffled classes, as the
        paper's one image per ImageNet class; otherwise uniformly.
        """
        if n < 0:
            raise SourceError(f"cannot sample {n} images")
        excluded = set(exclude)
        available = [image for image in self.images if image.relative_path not in excluded]
        if n > len(available):
            raise SourceError(
                f"image source {str(self.root)!r} has {len(available)} unused images "
                f"({len(self.images)} in all, {len(self.images) - len(available)} already shown); "
                f"{n} are needed"
            )
        rng = np.random.default_rng(seed)
        if not spread_classes:
            picks = rng.choice(len(available), size=n, replace=False)
            return [available[int(i)] for i in picks]
        by_class: dict[str, list[SourceImage]] = {}
        for image in available:
            by_class.setdefault(image.class_label, []).append(image)
        queues = []
        for label in sorted(by_class):
            members = by_class[label]
            queues.append([members[int(i)] for i in rng.permutation(len(members))])
        order = [int(i) for i in rng.permutation(len(queues))]
        chosen: list[SourceImage] = []
        while len(chosen) < n:
            for q in order:
                if queues[q] and len(chosen) < n:
                    chosen.append(queues[q].pop())
        return chosen

    def partner_for(
        self, image: SourceImage, *, seed: int, avoid: Sequence[str] = ()
    ) -> SourceImage:
        """An image of another class (the interpolation control's target)."""
        avoided = set(avoid)
        others = [
            c
            for c in self.images
            if c.class_label != image.class_label and c.relative_path not in avoided
        ]
        if not others:
            raise SourceError(
                f"image source {str(self.root)!r} has no class other than {image.class_label!r}"
            )
        return others[int(np.random.default_rng(seed).integers(len(others)))]
