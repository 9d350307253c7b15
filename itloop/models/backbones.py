"""Backbones: image networks cut after a named layer, in a registry that refuses duplicate names.

A backbone takes [0, 1] RGB images and applies its own normalisation (ImageNet mean/std by
default), so every caller feeds the same pixels the stimuli are made of. The full architecture is
built on the meta device and only the part up to the cut is materialised and initialised, with an
explicit seed: a ResNet-50 cut at ``layer4.0`` never allocates ``layer4.1``, ``layer4.2`` or ``fc``.
The full architecture's key shapes are kept so that checkpoint keys after the cut can be told
apart from keys the architecture does not have at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from itloop.models.errors import RegistryError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneCard",
    "BackboneSpec",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Factory = Callable[[], nn.Module]


@dataclass(frozen=True)
class BackboneSpec:
    """A registered architecture: how to build it uncut, where it may be cut, how it is fed.

    cut_points: top-level children in the order the architecture's forward runs them; a cut may
    also fall inside one of them that is an ``nn.Sequential`` (``layer4.0``).
    """

    name: str
    factory: Factory
    default_layer: str
    cut_points: tuple[str, ...]
    input_hw: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class BackboneCard:
    """What a backbone is: architecture, cut, preprocessing, default input size, provenance.

    input_hw in pixels; mean/std per RGB channel of [0, 1] images; source describes the
    checkpoint the weights came from (file name, sha256, format), or is empty for a random init.
    """

    architecture: str
    layer: str
    input_hw: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_range: tuple[float, float] = (0.0, 1.0)
    seed: int | None = None
    source: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready builtins."""
        out = asdict(self)
        out["input_hw"] = list(self.input_hw)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        out["input_range"] = list(self.input_range)
        out["source"] = dict(self.source)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneCard:
        """Inverse of :meth:`to_dict`; raises ValueError naming a missing field."""
        try:
            return cls(
                architecture=str(data["architecture"]),
                layer=str(data["layer"]),
                input_hw=_pair(data["input_hw"]),
                mean=_triple(data["mean"]),
                std=_triple(data["std"]),
                input_range=cast(tuple[float, float], tuple(float(v) for v in data["input_range"])),
                seed=None if data.get("seed") is None else int(data["seed"]),
                source=dict(data.get("source", {})),
            )
        except KeyError as exc:
            raise ValueError(f"backbone card lacks field {exc.args[0]!r}: {dict(data)}") from exc


def _pair(values: Sequence[Any]) -> tuple[int, int]:
    h, w = (int(v) for v in values)
    return (h, w)


def _triple(values: Sequence[Any]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    *,
    default_layer: str,
    cut_points: Sequence[str],
    input_hw: tuple[int, int] = (224, 224),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Callable[[Factory], Factory]:
    """Register ``factory() -> nn.Module`` (the uncut, randomly built architecture) under ``name``.

    Raises RegistryError if the name is taken; the factory is returned unchanged.
    """

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise RegistryError(
                f"backbone {name!r} is already registered (by {_REGISTRY[name].factory!r})"
            )
        if default_layer.split(".")[0] not in cut_points:
            raise RegistryError(
                f"default layer {default_layer!r} of {name!r} is not under a cut point {cut_points}"
            )
        _REGISTRY[name] = BackboneSpec(
            name=name,
            factory=factory,
            default_layer=default_layer,
            cut_points=tuple(cut_points),
            input_hw=input_hw,
            mean=mean,
            std=std,
        )
        return factory

    return decorate


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; RegistryError lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RegistryError(f"unknown backbone {name!r}; registered: {list_backbones()}") from None


def _cut(full: nn.Module, layer: str, cut_points: tuple[str, ...], arch: str) -> nn.Sequential:
    """The children of ``full`` up to and including ``layer``, keeping the original key names."""
    head, _, tail = layer.partition(".")
    if head not in cut_points:
        raise ValueError(
            f"cannot cut {arch} at {layer!r}: the first part must be one of {cut_points}"
        )
    children = OrderedDict(full.named_children())
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    for point in cut_points[: cut_points.index(head)]:
        kept[point] = children[point]
    block = children[head]
    if tail:
        if "." in tail or not isinstance(block, nn.Sequential):
            raise ValueError(
                f"cannot cut {arch} at {layer!r}: only a direct child of a Sequential "
                f"({head!r} is {type(block).__name__}) can be a cut point"
            )
        names = [n for n, _ in block.named_children()]
        if tail not in names:
            raise ValueError(f"cannot cut {arch} at {layer!r}: {head!r} has children {names}")
        sub = OrderedDict(block.named_children())
        kept[head] = nn.Sequential(OrderedDict((n, sub[n]) for n in names[: names.index(tail) + 1]))
    else:
        kept[head] = block
    return nn.Sequential(kept)


def _initialise(trunk: nn.Module, generator: torch.Generator) -> None:
    """torchvision's ResNet initialisation, from ``generator``, for every tensor of ``trunk``.

    Raises TypeError naming a module with parameters this function does not know how to fill,
    so no tensor is ever left as uninitialised memory.
    """
    with torch.no_grad():
        for name, module in trunk.named_modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01, generator=generator)
                nn.init.zeros_(module.bias)
            elif any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)
            ):
                raise TypeError(f"no initialisation rule for {name!r} ({type(module).__name__})")


class Backbone(nn.Module):
    """A network cut after a named layer: (B, 3, H, W) [0, 1] RGB -> (B, C, h, w) features.

    Normalisation by the card's mean/std happens inside; those are buffers that are not part of
    the state dict (they are in the card). ``trunk`` holds the layers with their original names.
    """

    def __init__(
        self,
        trunk: nn.Module,
        card: BackboneCard,
        *,
        reference_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self._card = card
        self.reference_shapes: dict[str, tuple[int, ...]] = dict(reference_shapes or {})
        self.register_buffer("mean", torch.tensor(card.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(card.std).view(1, 3, 1, 1), persistent=False)
        self._out_shapes: dict[tuple[int, int], tuple[int, int, int]] = {}

    @property
    def name(self) -> str:
        return self._card.architecture

    @property
    def layer(self) -> str:
        return self._card.layer

    @property
    def input_hw(self) -> tuple[int, int]:
        """The input size (H, W) in pixels this backbone was designed for."""
        return self._card.input_hw

    def card(self) -> BackboneCard:
        return self._card

    def with_source(self, source: Mapping[str, Any]) -> None:
        """Record where the weights came from (file name, sha256, format) in the card."""
        c = self._card
        self._card = BackboneCard(
            c.architecture, c.layer, c.input_hw, c.mean, c.std, c.input_range, c.seed, dict(source)
        )

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, C, h, w) features."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB images, got {tuple(images.shape)}")
        mean = cast(Tensor, self.mean)
        std = cast(Tensor, self.std)
        return cast(Tensor, self.trunk((images - mean) / std))

    def out_shape(self, input_hw: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the features for an input of ``input_hw`` pixels (default: the card's)."""
        hw = self.input_hw if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
        if hw not in self._out_shapes:
            ref = next(self.trunk.parameters())
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    out = self(torch.zeros(1, 3, *hw, device=ref.device, dtype=ref.dtype))
            finally:
                self.train(was_training)
            c, h, w = (int(s) for s in out.shape[1:])
            self._out_shapes[hw] = (c, h, w)
        return self._out_shapes[hw]


def build_backbone(
    name: str,
    *,
    layer: str | None = None,
    pretrained_path: str | Path | None = None,
    trusted: bool = False,
    seed: int = 0,
) -> Backbone:
    """Build the registered architecture ``name`` cut after ``layer`` (default: the entry's).

    Weights are a random init from ``seed`` unless ``pretrained_path`` names a checkpoint
    (robustness, torchvision/timm state dict or safetensors; see itloop.models.checkpoints);
    keys after the cut are ignored, all others must fit exactly. ``trusted`` allows full
    unpickling of that file and is required for MadryLab robustness files.
    """
    spec = backbone_spec(name)
    cut_at = spec.default_layer if layer is None else layer
    with torch.device("meta"):
        full = spec.factory()
    reference = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    trunk = _cut(full, cut_at, spec.cut_points, name)
    trunk = trunk.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    _initialise(trunk, generator)
    card = BackboneCard(
        architecture=name,
        layer=cut_at,
        input_hw=spec.input_hw,
        mean=spec.mean,
        std=spec.std,
        seed=seed,
    )
    backbone = Backbone(trunk, card, reference_shapes=reference)
    if pretrained_path is not None:
        from itloop.models.checkpoints import load_into_backbone

        load_into_backbone(backbone, Path(pretrained_path), trusted=trusted)
    return backbone


_RESNET_CUTS = (
    "conv1",
    "bn1",
    "relu",
    "maxpool",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "avgpool",
)


@register_backbone("resnet50", default_layer="layer4.0", cut_points=_RESNET_CUTS)
def _resnet50() -> nn.Module:
    return cast(nn.Module, tvm.resnet50(weights=None))


@register_backbone("resnet18", default_layer="layer3", cut_points=_RESNET_CUTS)
def _resnet18() -> nn.Module:
    return cast(nn.Module, tvm.resnet18(weights=None))


@register_backbone("wide_resnet50_2", default_layer="layer4.0", cut_points=_RESNET_CUTS)
def _wide_resnet50_2() -> nn.Module:
    return cast(nn.Module, tvm.wide_resnet50_2(weights=None))


@register_backbone("wide_resnet50_4", default_layer="layer4.0", cut_points=_RESNET_CUTS)
def _wide_resnet50_4() -> nn.Module:
    """The robustness library's WideResNet50-4: ResNet-50 with 4× the bottleneck width."""
    return cast(nn.Module, tvm.ResNet(tvm.resnet.Bottleneck, [3, 4, 6, 3], width_per_group=256))


def _tiny_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    conv = partial(nn.Conv2d, kernel_size=kernel, stride=2, padding=kernel // 2, bias=False)
    return nn.Sequential(conv(c_in, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@register_backbone(
    "tiny", default_layer="block3", cut_points=("block1", "block2", "block3"), input_hw=(64, 64)
)
def _tiny() -> nn.Module:
    """Three stride-2 conv blocks (16, 32, 64 channels): 64×64 -> (64, 8, 8); tests and demos."""
    return nn.Sequential(
        OrderedDict(
            block1=_tiny_block(3, 16, 5),
            block2=_tiny_block(16, 32, 3),
            block3=_tiny_block(32, 64, 3),
        )
    )
