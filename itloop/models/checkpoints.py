"""Lab-provided checkpoints: read, check against the architecture, convert once to plain files.

Formats read:

- MadryLab ``robustness`` files: a (dill) pickle with the state dict under ``model``, keys
  ``module.model.*`` (the network), ``module.attacker.*`` (a second copy used by the attacker)
  and ``module.normalizer.*`` (mean/std). The network keys are kept with the prefix stripped, the
  other two are dropped, and the normaliser is checked against the backbone's preprocessing.
  These files need ``trusted=True``: reading them may unpickle arbitrary objects.
- torchvision / timm state dicts, bare or under ``state_dict`` / ``model``, with or without the
  ``module.`` prefix of DataParallel; read with ``torch.load(weights_only=True)``.
- safetensors.

Keys are matched against a cut backbone: every key the trunk has must be present with its shape;
keys that belong to the full architecture but lie after the cut (``layer4.1.*``, ``fc.*`` for a
ResNet-50 cut at ``layer4.0``) are ignored and counted; any other key is an error, so a checkpoint
of the wrong architecture never loads half-way.

The converted form is ``backbone.safetensors`` (the trunk's state dict, torchvision key names)
and ``backbone.json`` (the card: architecture, layer, preprocessing, input size, the source's
sha256 and the weights file's sha256).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from itloop.models.errors import CheckpointError, CheckpointMismatchError, UntrustedCheckpointError

if TYPE_CHECKING:
    from itloop.models.backbones import Backbone

__all__ = [
    "CheckpointFormat",
    "ConvertedCheckpoint",
    "MatchReport",
    "SourceCheckpoint",
    "convert_checkpoint",
    "load_converted",
    "load_into_backbone",
    "match_state_dict",
    "read_checkpoint",
    "read_saved",
    "sha256_file",
]

CheckpointFormat = Literal["robustness", "state_dict", "safetensors"]
WEIGHTS_FILE = "backbone.safetensors"
CARD_FILE = "backbone.json"
_SHOWN = 5


def read_saved(
    folder: Path, card_file: str, weights_file: str, *, what: str
) -> tuple[dict[str, Any], Path]:
    """(card, weights path) of a folder written with a JSON card beside its weights, after
    checking both exist and the weights' sha256 is the one the card records."""
    card_path, weights = folder / card_file, folder / weights_file
    for required in (card_path, weights):
        if not required.is_file():
            raise CheckpointError(f"{what} {folder} lacks {required.name}")
    card: dict[str, Any] = json.loads(card_path.read_text())
    sha = sha256_file(weights)
    if sha != card.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} has sha256 {sha}, but its card records {card.get('weights_sha256')}"
        )
    return card, weights


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceCheckpoint:
    """A checkpoint read from disk, its state dict normalised to the bare network's key names.

    normalizer_mean/std: the robustness wrapper's own preprocessing, when the file carries one.
    """

    path: Path
    sha256: str
    format: CheckpointFormat
    state_dict: dict[str, Tensor]
    wrapper_keys_dropped: int = 0
    normalizer_mean: tuple[float, ...] | None = None
    normalizer_std: tuple[float, ...] | None = None


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown}, … (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else shown


def _sniff(path: Path) -> Literal["zip", "safetensors", "pickle"]:
    with path.open("rb") as fh:
        head = fh.read(9)
    if head[:2] == b"PK":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "pickle"


def _untrusted(path: Path, why: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"{path} {why}; reading it runs arbitrary code from the file. If it comes from a source "
        "you trust (e.g. the lab's own robustness training run), load it with trusted=True "
        "(CLI: --trusted)."
    )


def _torch_load(path: Path, *, trusted: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            hint = f" (first: {found.group(1)})" if found else ""
            raise _untrusted(path, f"holds pickled Python objects beyond tensors{hint}") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    import dill

    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=dill)
    except Exception as exc:  # any unpickling failure of a trusted file
        raise CheckpointError(f"{path} could not be unpickled even as trusted: {exc}") from exc


def _tensor_dict(obj: Mapping[Any, Any], path: Path, where: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path}: {where}[{key!r}] is a {type(value).__name__}, not a tensor"
            )
        out[str(key)] = value
    return out


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict inside a loaded pickle and where it was found."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a mapping")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return _tensor_dict(obj, path, "checkpoint"), "top level"
    for key in ("state_dict", "model", "state_dict_ema", "model_state"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return _tensor_dict(inner, path, repr(key)), repr(key)
    raise CheckpointError(
        f"{path} has no state dict: top-level keys are {sorted(map(str, obj))[:10]}; "
        "expected tensors, or a mapping under 'state_dict' or 'model'"
    )


def _robustness(state: dict[str, Tensor], path: Path, sha: str) -> SourceCheckpoint:
    net = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    wrapper = [k for k in state if k.startswith(("attacker.", "normalizer."))]
    other = [k for k in state if not k.startswith(("model.", "attacker.", "normalizer."))]
    if other:
        raise CheckpointError(
            f"{path}: robustness checkpoint has {len(other)} keys outside model./attacker./"
            f"normalizer.: {_preview(sorted(other))}"
        )
    if not net:
        raise CheckpointError(f"{path}: robustness checkpoint has no 'module.model.*' keys")
    mean = state.get("normalizer.new_mean")
    std = state.get("normalizer.new_std")
    return SourceCheckpoint(
        path=path,
        sha256=sha,
        format="robustness",
        state_dict=net,
        wrapper_keys_dropped=len(wrapper),
        normalizer_mean=None if mean is None else tuple(float(v) for v in mean.flatten()),
        normalizer_std=None if std is None else tuple(float(v) for v in std.flatten()),
    )


def read_checkpoint(path: str | Path, *, trusted: bool = False) -> SourceCheckpoint:
    """Read a robustness, torchvision/timm or safetensors checkpoint onto the CPU.

    Raises UntrustedCheckpointError for a robustness file (or any pickle needing more than
    ``weights_only``) unless ``trusted``; CheckpointError for anything unreadable.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file} does not exist or is not a file")
    sha = sha256_file(file)
    if _sniff(file) == "safetensors":
        try:
            state = load_file(str(file), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
        return SourceCheckpoint(path=file, sha256=sha, format="safetensors", state_dict=state)
    state, _ = _unwrap(_torch_load(file, trusted=trusted), file)
    state = _strip(state, "module.")
    if any(k.startswith(("attacker.", "normalizer.")) for k in state):
        if not trusted:
            raise _untrusted(file, "is a MadryLab robustness checkpoint (a dill pickle)")
        return _robustness(state, file, sha)
    return SourceCheckpoint(path=file, sha256=sha, format="state_dict", state_dict=state)


@dataclass(frozen=True)
class MatchReport:
    """Which checkpoint keys were loaded and which were ignored as lying after the cut."""

    loaded: tuple[str, ...]
    ignored_after_cut: tuple[str, ...]


def match_state_dict(
    state: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    reference: Mapping[str, tuple[int, ...]] | None = None,
    what: str = "the model",
) -> MatchReport:
    """Check ``state`` against the shapes a (cut) model ``expected``.

    reference: key shapes of the full architecture; its keys absent from ``expected`` are the
    ones after the cut and are ignored. Raises CheckpointMismatchError naming the first few
    missing and unexpected keys, their counts, and every shape mismatch.
    """
    ref = reference or {}
    missing = sorted(k for k in expected if k not in state)
    after_cut = sorted(k for k in state if k not in expected and k in ref)
    unexpected = sorted(k for k in state if k not in expected and k not in ref)
    mismatched = tuple(
        (k, tuple(state[k].shape), tuple(expected[k]))
        for k in sorted(expected)
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
        if mismatched:
            shown = "; ".join(
                f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:_SHOWN]
            )
            parts.append(f"{len(mismatched)} shape mismatches: {shown}")
        raise CheckpointMismatchError(
            f"checkpoint does not fit {what}: " + "; ".join(parts),
            missing=tuple(missing),
            unexpected=tuple(unexpected),
            mismatched=mismatched,
        )
    return MatchReport(loaded=tuple(sorted(expected)), ignored_after_cut=tuple(after_cut))


def load_into_backbone(
    backbone: Backbone, path: str | Path, *, trusted: bool = False
) -> MatchReport:
    """Load a checkpoint's weights into ``backbone`` in place and record the source in its card."""
    source = read_checkpoint(path, trusted=trusted)
    card = backbone.card()
    if source.normalizer_mean is not None and source.normalizer_std is not None:
        close = all(
            abs(a - b) < 1e-4
            for a, b in zip(
                source.normalizer_mean + source.normalizer_std, card.mean + card.std, strict=True
            )
        )
        if not close:
            raise CheckpointError(
                f"{source.path} normalises with mean {source.normalizer_mean} std "
                f"{source.normalizer_std}, but backbone {card.architecture!r} feeds mean "
                f"{card.mean} std {card.std}"
            )
    trunk_state = backbone.trunk.state_dict()
    expected = {k: tuple(v.shape) for k, v in trunk_state.items()}
    what = f"backbone {card.architecture!r} cut at {card.layer!r} (file {source.path})"
    report = match_state_dict(
        source.state_dict, expected, reference=backbone.reference_shapes, what=what
    )
    backbone.trunk.load_state_dict({k: source.state_dict[k] for k in expected}, strict=True)
    backbone.with_source(
        {
            "file": source.path.name,
            "sha256": source.sha256,
            "format": source.format,
            "keys_loaded": len(report.loaded),
            "keys_ignored_after_cut": len(report.ignored_after_cut),
            "wrapper_keys_dropped": source.wrapper_keys_dropped,
        }
    )
    return report


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """The plain files a checkpoint was converted to, and the card written beside them."""

    weights_path: Path
    card_path: Path
    card: dict[str, Any]


def convert_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    *,
    backbone: str,
    layer: str | None = None,
    trusted: bool = False,
) -> ConvertedCheckpoint:
    """Read, check and convert a lab checkpoint once into ``out_dir``/backbone.{safetensors,json}.

    The card records architecture, layer, preprocessing, input size and output shape (C, h, w),
    the source file's sha256 and format, and the sha256 of the weights file written.
    """
    from itloop.models.backbones import build_backbone

    net = build_backbone(backbone, layer=layer, pretrained_path=source, trusted=trusted)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in net.trunk.state_dict().items()}
    save_file(state, str(weights))
    card = net.card().to_dict()
    card["out_shape"] = list(net.out_shape())
    card["weights_sha256"] = sha256_file(weights)
    card_path = out / CARD_FILE
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return ConvertedCheckpoint(weights_path=weights, card_path=card_path, card=card)


def load_converted(directory: str | Path) -> Backbone:
    """The backbone saved by :func:`convert_checkpoint`, its weights checked against the card."""
    from itloop.models.backbones import BackboneCard, build_backbone

    data, weights = read_saved(
        Path(directory), CARD_FILE, WEIGHTS_FILE, what="converted checkpoint"
    )
    card = BackboneCard.from_dict(data)
    net = build_backbone(card.architecture, layer=card.layer)
    state = load_file(str(weights), device="cpu")
    expected = {k: tuple(v.shape) for k, v in net.trunk.state_dict().items()}
    match_state_dict(state, expected, what=f"the card's {card.architecture!r} at {card.layer!r}")
    net.trunk.load_state_dict(state, strict=True)
    net.with_source(card.source)
    return net
