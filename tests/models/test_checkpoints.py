"""Each checkpoint format the lab provides loads into a cut backbone; wrong ones fail clearly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dill
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import Tensor

from itloop.models import (
    CheckpointError,
    CheckpointMismatchError,
    UntrustedCheckpointError,
    build_backbone,
    convert_checkpoint,
    load_converted,
    read_checkpoint,
)
from itloop.models.backbones import IMAGENET_MEAN, IMAGENET_STD


def _state(arch: str, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():  # non-trivial running statistics, so buffers are checked too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resnet50_state() -> dict[str, Tensor]:
    return _state("resnet50", 11)


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, Tensor]:
    return _state("resnet18", 12)


def _robustness_file(
    path: Path,
    state: dict[str, Tensor],
    *,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    with_lambda: bool = True,
) -> Path:
    """A file laid out like MadryLab robustness writes it: DataParallel(AttackerModel), dill."""
    norm = {
        "new_mean": torch.tensor(mean).view(3, 1, 1),
        "new_std": torch.tensor(std).view(3, 1, 1),
    }
    wrapped: dict[str, Tensor] = {}
    for key, value in norm.items():
        wrapped[f"module.normalizer.{key}"] = value
        wrapped[f"module.attacker.normalizer.{key}"] = value
    for key, value in state.items():
        wrapped[f"module.model.{key}"] = value
        wrapped[f"module.attacker.model.{key}"] = value
    payload: dict[str, object] = {"model": wrapped, "epoch": 90, "optimizer": {"state": {}}}
    if with_lambda:
        payload["schedule"] = lambda epoch: 0.1 ** (epoch // 30)
    torch.save(payload, path, pickle_module=dill)
    return path


def _assert_trunk_equals(
    backbone_name: str, path: Path, state: dict[str, Tensor], **kw: object
) -> None:
    backbone = build_backbone(backbone_name, pretrained_path=path, **kw)  # type: ignore[arg-type]
    trunk = backbone.trunk.state_dict()
    assert trunk, "the trunk has weights"
    for key, value in trunk.items():
        assert torch.equal(value, state[key]), key
    source = backbone.card().source
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["keys_loaded"] == len(trunk)


def test_robustness_file_loads_when_trusted(
    tmp_path: Path, resnet50_state: dict[str, Tensor]
) -> None:
    path = _robustness_file(tmp_path / "imagenet_l2_3_0.pt", resnet50_state)
    _assert_trunk_equals("resnet50", path, resnet50_state, trusted=True)
    source = build_backbone("resnet50", pretrained_path=path, trusted=True).card().source
    assert source["format"] == "robustness"
    assert source["wrapper_keys_dropped"] == len(resnet50_state) + 4
    after_cut = [k for k in resnet50_state if k.startswith(("layer4.1.", "layer4.2.", "fc."))]
    assert source["keys_ignored_after_cut"] == len(after_cut) > 0


@pytest.mark.parametrize("with_lambda", [True, False])
def test_untrusted_robustness_file_is_refused(
    tmp_path: Path, resnet18_state: dict[str, Tensor], with_lambda: bool
) -> None:
    path = _robustness_file(tmp_path / "robust.pt", resnet18_state, with_lambda=with_lambda)
    with pytest.raises(UntrustedCheckpointError, match=r"robust\.pt.*trusted=True"):
        read_checkpoint(path)


def test_robustness_normaliser_must_match_the_backbone(
    tmp_path: Path, resnet18_state: dict[str, Tensor]
) -> None:
    cifar = _robustness_file(
        tmp_path / "cifar.pt", resnet18_state, mean=(0.4914, 0.4822, 0.4465), std=(0.2, 0.2, 0.2)
    )
    with pytest.raises(CheckpointError, match=r"mean \(0\.4914"):
        build_backbone("resnet18", pretrained_path=cifar, trusted=True)


def test_torchvision_state_dict(tmp_path: Path, resnet18_state: dict[str, Tensor]) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    _assert_trunk_equals("resnet18", path, resnet18_state)
    assert read_checkpoint(path).format == "state_dict"


def test_timm_checkpoint_under_state_dict_with_dataparallel_prefix(
    tmp_path: Path, resnet18_state: dict[str, Tensor]
) -> None:
    path = tmp_path / "timm_train.pth.tar"
    wrapped = {f"module.{k}": v for k, v in resnet18_state.items()}
    torch.save({"state_dict": wrapped, "epoch": 3, "arch": "resnet18"}, path)
    _assert_trunk_equals("resnet18", path, resnet18_state)


def test_safetensors(tmp_path: Path, resnet18_state: dict[str, Tensor]) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    _assert_trunk_equals("resnet18", path, resnet18_state)
    assert read_checkpoint(path).format == "safetensors"


def test_wrong_architecture_names_missing_unexpected_and_mismatched_keys(
    tmp_path: Path, resnet18_state: dict[str, Tensor]
) -> None:
    path = tmp_path / "resnet18.pth"
    state = dict(resnet18_state)
    state["head.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_backbone("resnet50", pretrained_path=path)
    message = str(info.value)
    assert "backbone 'resnet50' cut at 'layer4.0'" in message
    assert "resnet18.pth" in message
    assert f"{len(info.value.missing)} missing keys: " in message
    assert "layer1.0.conv3.weight" in info.value.missing
    assert info.value.unexpected == ("head.weight",)
    assert "1 unexpected keys: head.weight" in message
    assert ("layer1.0.conv1.weight", (64, 64, 3, 3), (64, 64, 1, 1)) in info.value.mismatched
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 3, 3) vs model (64, 64, 1, 1)" in message


def test_a_missing_key_alone_is_named(tmp_path: Path, resnet18_state: dict[str, Tensor]) -> None:
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in resnet18_state.items() if k != "bn1.running_var"}, path)
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: bn1\.running_var$"):
        build_backbone("resnet18", pretrained_path=path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"epoch": 1, "notes": "hi"}, path)
    with pytest.raises(
        CheckpointError, match=r"no state dict: top-level keys are \['epoch', 'notes'\]"
    ):
        read_checkpoint(path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"junk\.bin"):
        read_checkpoint(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pt")


def test_convert_once_then_load_the_plain_files(
    tmp_path: Path, resnet50_state: dict[str, Tensor]
) -> None:
    source = _robustness_file(tmp_path / "robust.pt", resnet50_state)
    converted = convert_checkpoint(source, tmp_path / "out", backbone="resnet50", trusted=True)
    card = json.loads(converted.card_path.read_text())
    assert card == converted.card
    assert card["architecture"] == "resnet50"
    assert card["layer"] == "layer4.0"
    assert card["input_hw"] == [224, 224]
    assert card["out_shape"] == [2048, 7, 7]
    assert card["mean"] == list(IMAGENET_MEAN)
    assert card["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert card["source"]["format"] == "robustness"
    assert card["weights_sha256"] == hashlib.sha256(converted.weights_path.read_bytes()).hexdigest()

    loaded = load_converted(tmp_path / "out")
    for key, value in loaded.trunk.state_dict().items():
        assert torch.equal(value, resnet50_state[key]), key
    assert loaded.card().source == card["source"]
    again = build_backbone("resnet50", pretrained_path=converted.weights_path)
    assert again.card().source["format"] == "safetensors"

    converted.weights_path.write_bytes(converted.weights_path.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="sha256"):
        load_converted(tmp_path / "out")
