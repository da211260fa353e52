"""Backbones, weight loading (torchvision / MoCo / nested checkpoints) and the clustering model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from scan_engine.models import (
    BackboneWeightsError,
    ClusteringModel,
    ResNet,
    build_backbone,
    load_backbone_weights,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core box: extra intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-default BN statistics and affine terms, so that eval-mode features depend on them
    and a loader that skipped buffers would be caught."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.data.copy_(1 + 0.1 * torch.randn(shape, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    ("name", "width", "expected"),
    [
        ("resnet18", 8, 64),
        ("resnet34", 8, 64),
        ("resnet50", 8, 256),
        ("resnet18", 16, 128),
        ("resnet50", 16, 512),
    ],
)
def test_feature_dims_small_widths(name: str, width: int, expected: int) -> None:
    torch.manual_seed(0)
    backbone = ResNet(name, width=width)
    assert backbone.feature_dim == expected
    backbone.eval()
    with torch.no_grad():
        features = backbone(_images())
    assert features.shape == (2, expected)


@pytest.mark.parametrize(
    ("name", "expected"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)]
)
def test_feature_dims_stock_width(name: str, expected: int) -> None:
    # Width 64 is torchvision's layout: 8·w for the basic-block nets, 32·w for resnet50.
    # Built on the meta device: shapes only, no memory, no time.
    with torch.device("meta"):
        backbone = ResNet(name, width=64, cifar_stem=False)
    assert backbone.feature_dim == expected
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)(weights=None)
    assert reference.fc.in_features == expected


def _stem(backbone: ResNet, x: torch.Tensor) -> torch.Tensor:
    return backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))


def test_cifar_stem_keeps_resolution() -> None:
    torch.manual_seed(0)
    x = _images(size=16)
    cifar = ResNet("resnet18", width=8, cifar_stem=True).eval()
    standard = ResNet("resnet18", width=8, cifar_stem=False).eval()
    with torch.no_grad():
        assert _stem(cifar, x).shape == (2, 8, 16, 16)  # 3×3 conv, stride 1, no max-pool
        assert _stem(standard, x).shape == (2, 8, 4, 4)  # 7×7 stride 2 + max-pool: /4
        # Both still end in pooled (B, D) features.
        assert cifar(x).shape == standard(x).shape == (2, 64)


@pytest.mark.parametrize(("image_size", "cifar"), [(16, True), (32, True), (64, True), (96, False)])
def test_build_backbone_picks_stem_by_image_size(image_size: int, cifar: bool) -> None:
    backbone = build_backbone("resnet18", 8, image_size)
    assert backbone.cifar_stem is cifar
    assert backbone.conv1.kernel_size == ((3, 3) if cifar else (7, 7))
    assert isinstance(backbone.maxpool, nn.Identity) is cifar


def test_unknown_backbone_name() -> None:
    with pytest.raises(ValueError, match="resnet101"):
        ResNet("resnet101", width=8)


# ---------------------------------------------------------------- weight loading


def _bare(state: dict[str, torch.Tensor]) -> object:
    return state


def _moco(state: dict[str, torch.Tensor]) -> object:
    # MoCo v2 checkpoint: query encoder under module.encoder_q. with an MLP `fc` head, the key
    # encoder and the queue beside it.
    wrapped: dict[str, torch.Tensor] = {f"module.encoder_q.{k}": v for k, v in state.items()}
    wrapped["module.encoder_q.fc.0.weight"] = torch.randn(32, 64)
    wrapped["module.encoder_q.fc.0.bias"] = torch.randn(32)
    wrapped["module.encoder_q.fc.2.weight"] = torch.randn(16, 32)
    wrapped["module.encoder_k.conv1.weight"] = torch.randn_like(state["conv1.weight"])
    wrapped["module.queue"] = torch.randn(16, 8)
    return {"epoch": 200, "arch": "resnet18", "state_dict": wrapped}


def _nested_backbone(state: dict[str, torch.Tensor]) -> object:
    return {"state_dict": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 3}


def _dino_teacher(state: dict[str, torch.Tensor]) -> object:
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["head.mlp.0.weight"] = torch.randn(8, 64)
    return {"teacher": teacher, "student": {}, "epoch": 1}


@pytest.mark.parametrize("wrap", [_bare, _moco, _nested_backbone, _dino_teacher])
def test_weights_round_trip(tmp_path: Path, wrap: Callable[[dict], object]) -> None:
    torch.manual_seed(1)
    source = ResNet("resnet18", width=8)
    _randomise_batchnorm(source, seed=1)
    path = tmp_path / "weights.pth"
    torch.save(wrap(source.state_dict()), path)

    torch.manual_seed(2)
    target = ResNet("resnet18", width=8)
    x = _images()
    with torch.no_grad():
        before = target.eval()(x)
        load_backbone_weights(target, path)
        after = target.eval()(x)
        expected = source.eval()(x)
    assert not torch.allclose(before, expected)  # the load had something to change
    assert torch.equal(after, expected)


def test_torchvision_resnet18_weights_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    _randomise_batchnorm(reference, seed=3)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # includes fc.weight / fc.bias: ignored

    backbone = ResNet("resnet18", 64, cifar_stem=False)
    load_backbone_weights(backbone, path)
    reference.fc = nn.Identity()
    x = _images(size=16)
    with torch.no_grad():
        ours = backbone.eval()(x)
        theirs = reference.eval()(x)
    assert ours.shape == theirs.shape == (2, 512)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_wrong_architecture_weights_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "resnet50.pth"
    torch.save(ResNet("resnet50", width=8).state_dict(), path)
    backbone = ResNet("resnet18", width=8)
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    # resnet18's keys all exist in resnet50, with other shapes.
    with pytest.raises(BackboneWeightsError, match="shape mismatch") as caught:
        load_backbone_weights(backbone, path)
    assert str(path) in str(caught.value)
    # Nothing was half-loaded.
    assert all(torch.equal(v, original[k]) for k, v in backbone.state_dict().items())

    # The other way round keys are missing.
    small = tmp_path / "resnet18.pth"
    torch.save(ResNet("resnet18", width=8).state_dict(), small)
    with pytest.raises(BackboneWeightsError, match="missing keys"):
        load_backbone_weights(ResNet("resnet50", width=8), small)


def test_wrong_width_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save(ResNet("resnet18", width=16).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="shape mismatch"):
        load_backbone_weights(ResNet("resnet18", width=8), path)


def test_text_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(BackboneWeightsError, match="cannot read backbone weights") as caught:
        load_backbone_weights(ResNet("resnet18", width=8), path)
    assert "notes.pth" in str(caught.value)


def test_non_dict_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(BackboneWeightsError, match="state dict"):
        load_backbone_weights(ResNet("resnet18", width=8), path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(BackboneWeightsError, match="not found") as caught:
        load_backbone_weights(ResNet("resnet18", width=8), path)
    assert "absent.pth" in str(caught.value)
    # A folder is not a weights file either.
    with pytest.raises(BackboneWeightsError, match="not found"):
        load_backbone_weights(ResNet("resnet18", width=8), tmp_path)


# ---------------------------------------------------------------- clustering model


def test_clustering_model_outputs_and_keep_heads() -> None:
    torch.manual_seed(0)
    backbone = ResNet("resnet18", width=8)
    model = ClusteringModel(backbone, backbone.feature_dim, cluster_counts=[3, 6], num_heads=4)
    model.eval()
    x = _images(batch=5)
    with torch.no_grad():
        outputs = model(x)
    assert set(outputs) == {3, 6}
    assert outputs[3].shape == (4, 5, 3)
    assert outputs[6].shape == (4, 5, 6)
    # Heads are independent: differently initialised, so different logits.
    assert not torch.allclose(outputs[3][0], outputs[3][1])

    chosen_weights = model.heads["6"][1].weight.detach().clone()
    model.keep_heads({3: 2, 6: 1})
    assert len(model.heads["3"]) == len(model.heads["6"]) == 1
    assert torch.equal(model.heads["6"][0].weight, chosen_weights)
    with torch.no_grad():
        kept = model(x)
    assert kept[3].shape == (1, 5, 3) and kept[6].shape == (1, 5, 6)
    torch.testing.assert_close(kept[3][0], outputs[3][2])
    torch.testing.assert_close(kept[6][0], outputs[6][1])
    # The kept model still saves and loads as a plain state dict.
    fresh = ClusteringModel(
        ResNet("resnet18", width=8), backbone.feature_dim, cluster_counts=[3, 6], num_heads=1
    )
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x)[6], kept[6])
