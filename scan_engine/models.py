"""Backbones, the SimCLR projection head and the multi-head clustering model.

The ResNet here mirrors torchvision's module names (conv1, bn1, layer1.0.conv1, ...), so a
torchvision / MoCo / DINO state dict loads into it directly; it adds a `width` knob (64 = stock)
and the CIFAR stem (3×3 conv, no max-pool) that the paper uses for 32 px images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ResNet",
    "build_backbone",
    "ContrastiveModel",
    "ClusteringModel",
    "FeatureInput",
    "load_backbone_weights",
    "BackboneWeightsError",
]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_LAYOUTS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """A ResNet trunk that returns pooled features (B, feature_dim); no classifier."""

    def __init__(self, name: str = "resnet18", width: int = 64, cifar_stem: bool = True) -> None:
        super().__init__()
        if name not in _LAYOUTS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_LAYOUTS)}")
        block, depths = _LAYOUTS[name]
        self.cifar_stem = cifar_stem
        if cifar_stem:  # small images: keep resolution, no max-pool (paper, CIFAR setup)
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes = width
        stages = []
        for index, depth in enumerate(depths):
            planes = width * 2**index
            blocks = []
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(name: str, width: int, image_size: int) -> ResNet:
    """The paper's rule: CIFAR stem for small images (≤ 64 px), the standard stem above."""
    return ResNet(name, width=width, cifar_stem=image_size <= 64)


class ContrastiveModel(nn.Module):
    """Backbone + SimCLR projection head (2-layer MLP) -> L2-normalised (B, projection_dim)."""

    def __init__(self, backbone: ResNet, projection_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.feature_dim
        self.head = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


class ClusteringModel(nn.Module):
    """Backbone + `num_heads` linear heads for every cluster count C.

    forward returns {C: logits (num_heads, B, C)}. One backbone serves all cluster counts, so
    overclustering costs only extra linear heads, not extra backbones.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        cluster_counts: Sequence[int],
        num_heads: int,
        head_input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        # Unit-norm features bound a linear head's logits by its weight norm, which grows slowly;
        # a fixed scale (a softmax temperature) lets the heads become confident in a short run.
        self.head_input_scale = head_input_scale
        self.cluster_counts = list(cluster_counts)
        self.heads = nn.ModuleDict(
            {
                str(c): nn.ModuleList(nn.Linear(feature_dim, c) for _ in range(num_heads))
                for c in self.cluster_counts
            }
        )

    def forward_heads(self, features: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.head_input_scale != 1.0:
            features = features * self.head_input_scale
        return {
            int(c): torch.stack([head(features) for head in heads])
            for c, heads in self.heads.items()
        }

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.forward_heads(self.backbone(x))

    def keep_heads(self, chosen: dict[int, int]) -> None:
        """Drop every head but the chosen one per cluster count (after head selection)."""
        self.heads = nn.ModuleDict(
            {str(c): nn.ModuleList([self.heads[str(c)][chosen[c]]]) for c in self.cluster_counts}
        )


class FeatureInput(nn.Module):
    """The clustering model's backbone on this route: features arrive computed, (B, D) -> (B, D).
    The real backbone is referenced by name and weights sha256 in model.pt, not copied."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class BackboneWeightsError(ValueError):
    """A backbone weights file that is missing, unreadable or does not fit the backbone."""


_PREFIXES = (
    "module.encoder_q.",
    "module.backbone.",
    "module.",
    "encoder_q.",
    "encoder.",
    "backbone.",
    "model.",
)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        cleaned[key] = value
    return cleaned


def load_backbone_weights(backbone: ResNet, path: str | Path) -> None:
    """Load a local torchvision / MoCo / DINO style state dict into `backbone`.

    Accepts a bare state dict or one nested under "state_dict" / "model"; strips
    `module.encoder_q.` / `backbone.` style prefixes; ignores classifier (`fc.`) and projection
    keys. Every backbone parameter must be present, so a wrong file fails loudly.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated files: all mean "not a state dict"
        raise BackboneWeightsError(f"cannot read backbone weights {path}: {error}") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict):
        raise BackboneWeightsError(f"{path} does not hold a state dict")
    state = _strip_prefixes(loaded)
    expected = backbone.state_dict()
    state = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise BackboneWeightsError(
            f"{path} does not fit {type(backbone).__name__}: {len(missing)} missing keys, "
            f"e.g. {missing[:3]}"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise BackboneWeightsError(f"{path}: {not_tensors[:3]} are not tensors")
    mismatched = [k for k, v in state.items() if v.shape != expected[k].shape]
    if mismatched:
        raise BackboneWeightsError(f"{path}: shape mismatch for {mismatched[:3]}")
    backbone.load_state_dict(state, strict=False)
    logger.info("loaded backbone weights from %s (%d tensors)", path, len(state))
