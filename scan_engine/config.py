"""One typed configuration for the whole SCAN pipeline, with named presets.

Defaults follow the paper (Van Gansbeke et al., ECCV 2020, CIFAR-10 setup) unless a preset says
otherwise. Every model is frozen and rejects unknown keys, so a typo in an override is an error,
not a silently ignored option. The resolved config is stored as JSON with each job and checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "ConfigError",
    "PretextConfig",
    "ScanStepConfig",
    "SelfLabelConfig",
    "KSelectionConfig",
    "ScanConfig",
    "default_cluster_range",
    "PRESETS",
    "make_config",
]


class ConfigError(ValueError):
    """A configuration that cannot run: unknown preset, unknown key or a value out of range."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PretextConfig(_Frozen):
    """SimCLR instance discrimination (paper: 500 epochs, batch 512, SGD lr 0.4, T = 0.1)."""

    epochs: int = Field(500, ge=0, description="SimCLR epochs; 0 skips training (random init).")
    batch_size: int = Field(512, ge=2)
    lr: float = Field(0.4, gt=0, description="SGD learning rate, cosine-decayed to lr/1000.")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.1, gt=0, description="NT-Xent temperature.")
    projection_dim: int = Field(128, ge=2, description="Output of the 2-layer MLP head.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear learning-rate warm-up.")
    crop_scale_min: float = Field(0.2, gt=0, le=1, description="Random resized crop: min area.")
    fill_budget: bool = Field(
        False,
        description="With a time budget, train as many epochs as the pretext's share of it "
        "allows (more or fewer than `epochs`); without one, `epochs` applies.",
    )


class ScanStepConfig(_Frozen):
    """SCAN clustering step: neighbours agree, entropy keeps clusters apart (paper section 3.2)."""

    epochs: int = Field(50, ge=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-4, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-4, ge=0)
    entropy_weight: float = Field(5.0, ge=0, description="λ on the entropy of the mean prediction.")
    num_heads: int = Field(10, ge=1, description="Heads trained per cluster count; best is kept.")
    num_neighbors: int = Field(20, ge=1, description="K nearest neighbours mined per image.")
    update_backbone: bool = Field(True, description="Fine-tune the backbone (paper, small images).")
    augment: bool = Field(True, description="Strong augmentation on image and neighbour.")
    feature_scale: float = Field(
        20.0,
        gt=0,
        description="Heads on cached unit-norm features (backbone fixed) read them times this: "
        "a sharper softmax, so that self-labeling finds confident predictions.",
    )
    feature_noise: float = Field(
        0.0,
        ge=0,
        description="Heads on cached features: the neighbour side sees its feature plus Gaussian "
        "noise of this norm relative to the feature (a feature-space augmentation; 0: none).",
    )
    head_selection: Literal["loss", "consensus"] = Field(
        "loss",
        description="Which head is kept per cluster count: the lowest SCAN loss (paper) or the "
        "one the other heads agree with most (on fixed features the loss often picks a sharp, "
        "lopsided head).",
    )


class SelfLabelConfig(_Frozen):
    """Self-labeling on confident predictions (paper section 3.3)."""

    enabled: bool = True
    epochs: int = Field(200, ge=0)
    batch_size: int = Field(1000, ge=2)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    threshold: float = Field(0.99, gt=0, lt=1, description="max p above which a label is trusted.")
    plateau_patience: int = Field(
        3, ge=1, description="Stop after this many epochs without more confident samples."
    )


class KSelectionConfig(_Frozen):
    """Choosing K without labels (scan_engine.model_selection): candidate heads are SCAN-trained
    on the mined features, which stay fixed, so they are linear heads on cached features and cheap
    even on a CPU. Number of heads and entropy weight come from `scan`."""

    steps: int = Field(500, ge=1, description="Optimiser steps of the candidate heads.")
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the candidate heads.")


class ScanConfig(_Frozen):
    """Everything a pipeline run needs besides the images, the work folder and the device."""

    preset: str = "paper"
    num_clusters: int = Field(10, ge=2, description="K, the number of groups asked for.")
    overcluster: float | list[int] | None = Field(
        None,
        description="A factor (C = round(factor·K)) or an explicit list of cluster counts C.",
    )
    num_clusters_range: tuple[int, int] | None = Field(
        None,
        description="K unknown: the pipeline picks K in [low, high] by a label-free score "
        "before the SCAN step and sets num_clusters to it (default: low, until chosen).",
    )
    k_selection: KSelectionConfig = KSelectionConfig()
    image_size: int = Field(
        32,
        ge=8,
        le=512,
        description="Shorter side resized, centre crop. The pretrained route sets it to the "
        "backbone's input size.",
    )
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    backbone_width: int = Field(64, ge=8, description="Channels of the first stage (64 = stock).")
    backbone_weights: str | None = Field(
        None, description="Local state dict: skips the pretext and freezes the backbone."
    )
    pretrained_backbone: str | None = Field(
        None,
        description="A named backbone (scan_engine.backbones, e.g. efficientnet_lite0, "
        "dinov2_vits14): the pretrained route. Its features are streamed once per collection "
        "and cached, no pretext runs, and the heads train on the features; image_size is the "
        "backbone's own input size. None: SimCLR from scratch (the scratch route).",
    )
    models_dir: str | None = Field(
        None,
        description="The models folder holding imported backbone weights (scan-weights); "
        "bundled and hub-cached weights need none.",
    )
    feature_cache_dir: str | None = Field(
        None,
        description="Where the pretrained route caches features; give every job on one "
        "collection the same folder so that later jobs reuse them. None: inside the work folder.",
    )
    pretext: PretextConfig = PretextConfig()
    scan: ScanStepConfig = ScanStepConfig()
    selflabel: SelfLabelConfig = SelfLabelConfig()
    seed: int = 0
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="Fit every stage's epochs to its share of this budget (with "
        "pretext.fill_budget the pretext also grows into its share).",
    )
    precision: Literal["auto", "float32"] = Field(
        "auto",
        description="auto: bf16/fp16 autocast where the hardware runs it natively (CUDA, CPUs "
        "with AVX512-BF16 or AMX), channels_last everywhere; float32: full precision and the "
        "default memory layout, the same numbers on every machine.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the network for the pretext: about a minute of compiling "
        "buys ~15% faster steps of a stock-width network, none at half width.",
    )
    prototype_members: int = Field(10, ge=1, description="Most confident members averaged.")
    top_members: int = Field(12, ge=1, description="Members kept per cluster for the gallery.")
    eval_batch_size: int = Field(512, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _num_clusters_from_range(cls, values: Any) -> Any:
        # With only a range given, num_clusters holds its low end until the pipeline picks K.
        if isinstance(values, dict) and values.get("num_clusters") is None:
            span = values.get("num_clusters_range")
            if isinstance(span, list | tuple) and span and isinstance(span[0], int):
                values = {**values, "num_clusters": max(2, span[0])}
        return values

    @model_validator(mode="before")
    @classmethod
    def _image_size_from_backbone(cls, values: Any) -> Any:
        # The pretrained route feeds the backbone its own input size, whichever backbone it is.
        if (
            isinstance(values, dict)
            and values.get("pretrained_backbone") is not None
            and values.get("image_size") is None
        ):
            size = _backbone_input_size(values["pretrained_backbone"])
            if size is not None:
                values = {**values, "image_size": size}
        return values

    @field_validator("pretrained_backbone")
    @classmethod
    def _known_backbone(cls, name: str | None) -> str | None:
        if name is not None and _backbone_input_size(name) is None:
            from scan_engine.backbones.registry import list_backbones

            known = ", ".join(sorted(spec.name for spec in list_backbones()))
            raise ValueError(f"unknown backbone {name!r}; known: {known}")
        return name

    @model_validator(mode="after")
    def _check_pretrained_backbone(self) -> ScanConfig:
        if self.pretrained_backbone is None:
            return self
        # A convolutional backbone runs at any size (small photos, or a faster run: on CIFAR-10
        # EfficientNet-Lite0 at 160 px mines neighbours as pure as at 224); a ViT's position
        # grid is built for one size.
        from scan_engine.backbones.registry import get_spec

        spec = get_spec(self.pretrained_backbone)
        if self.image_size != spec.input_size and spec.timm_model.startswith("vit"):
            raise ValueError(
                f"backbone {self.pretrained_backbone!r} runs only at {spec.input_size} px, "
                f"not image_size {self.image_size} (leave image_size out)"
            )
        if self.backbone_weights is not None:
            raise ValueError(
                "backbone_weights (a ResNet state dict) and pretrained_backbone are two routes; "
                "give one of them"
            )
        return self

    @model_validator(mode="after")
    def _check_range(self) -> ScanConfig:
        if self.num_clusters_range is not None:
            low, high = self.num_clusters_range
            if not 2 <= low <= high:
                raise ValueError("num_clusters_range must be [low, high] with 2 <= low <= high")
            if not low <= self.num_clusters <= high:
                raise ValueError("num_clusters must lie inside num_clusters_range")
        return self

    @model_validator(mode="after")
    def _check_overcluster(self) -> ScanConfig:
        oc = self.overcluster
        if isinstance(oc, float | int) and not isinstance(oc, bool) and oc < 1:
            raise ValueError("overcluster factor must be >= 1")
        if isinstance(oc, list):
            if not oc:
                raise ValueError("overcluster list must not be empty")
            if any(c < 2 for c in oc):
                raise ValueError("every cluster count in overcluster must be >= 2")
        return self

    @property
    def fixed_backbone(self) -> bool:
        """The backbone never changes after the features are made (a pretrained one, or
        scan.update_backbone off): SCAN and self-labeling then train heads on cached features."""
        return (
            self.pretrained_backbone is not None
            or self.backbone_weights is not None
            or not self.scan.update_backbone
        )

    def cluster_counts(self, num_clusters: int | None = None) -> list[int]:
        """The cluster counts C to train: K itself, plus the overclustering ones, sorted, unique.

        `num_clusters` replaces K (e.g. each candidate of num_clusters_range)."""
        k = self.num_clusters if num_clusters is None else num_clusters
        counts = {k}
        oc = self.overcluster
        if isinstance(oc, list):
            counts.update(oc)
        elif oc is not None:
            counts.add(max(2, int(math.ceil(oc * k - 1e-9))))
        return sorted(counts)

    def candidate_counts(self) -> list[int]:
        """The candidates for K: every count of num_clusters_range, or just num_clusters."""
        if self.num_clusters_range is None:
            return [self.num_clusters]
        low, high = self.num_clusters_range
        return list(range(low, high + 1))

    def possible_cluster_counts(self) -> list[int]:
        """Every C a run may train, whichever candidate becomes K (for checks before a run)."""
        return sorted({c for k in self.candidate_counts() for c in self.cluster_counts(k)})

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def route(self) -> Literal["pretrained", "scratch"]:
        """pretrained: features of a named backbone; scratch: SimCLR on the collection."""
        return "pretrained" if self.pretrained_backbone is not None else "scratch"


def _backbone_input_size(name: object) -> int | None:
    """The registry's input size for backbone `name`; None when there is no such backbone."""
    # Imported here: the registry's package brings torch, which a config alone does not need.
    from scan_engine.backbones.registry import UnknownBackboneError, get_spec

    try:
        return get_spec(str(name)).input_size
    except UnknownBackboneError:
        return None


# Presets are partial overrides on top of the paper defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The default of the service and the command line: features of a real ImageNet-trained
    # backbone whose weights ship with the package (no download), cached once per collection;
    # only the heads train, on a CPU in seconds to minutes. image_size follows the backbone.
    "pretrained": {
        "pretrained_backbone": "efficientnet_lite0",
        "pretext": {"epochs": 0},
        # The consensus head: CIFAR-10 test, these features, seeds 0-2 on an Intel Xeon: median
        # SCAN ACC 48.1 (consensus) vs 47.8 (lowest loss); feature noise 0.5 gave 47.3, so it
        # stays off (benchmarks/pretrained_heads_cifar10.json).
        "scan": {
            "epochs": 60,
            "batch_size": 256,
            "lr": 1e-3,
            "update_backbone": False,
            "head_selection": "consensus",
        },
        # Self-labeling off: on fixed features it never helped (CIFAR-10 test, Xeon: refused by
        # the collapse guard on the product path; 46.6 vs SCAN's 47.8 with the heads direct;
        # balanced pseudo-labels 46.9 vs 46.7), and its augmented views cost two more backbone
        # passes per image. Enabling it (with these settings) embeds the views again.
        "selflabel": {"enabled": False, "epochs": 30, "batch_size": 500, "lr": 1e-3},
    },
    # The paper's CIFAR-10 schedule, for a GPU.
    "paper": {},
    # A shorter GPU schedule: larger batches and fewer epochs.
    "gpu": {
        "pretext": {"epochs": 200, "batch_size": 1024, "lr": 0.8, "warmup_epochs": 5},
        "scan": {"epochs": 30, "batch_size": 512, "lr": 2e-4},
        "selflabel": {"epochs": 40, "batch_size": 1000},
    },
    # Sized for a 2-core CPU: a narrower backbone gets more SimCLR epochs per hour, and after the
    # pretext the backbone stays fixed: SCAN and self-labeling train the heads on cached features
    # (seconds instead of backbone passes), so nearly all the time goes to the pretext.
    "cpu": {
        # Measured on cifar10_test, 2 Zen 4 cores, bf16: in 4.5 minutes of pretext, batch 128
        # reached neighbour purity 26.5% vs 23.1% at batch 256 (more steps per epoch, and faster
        # per image); heads on features scaled by 20 beat 5, 10 and 40 after a 27-minute pretext.
        "backbone_width": 32,
        # More SimCLR epochs keep paying at this scale, so a longer budget trains longer
        # (60 minutes: 40 epochs, purity@1 38.4%; 30 minutes: 28 epochs, 35.4%).
        "pretext": {
            "epochs": 40,
            "batch_size": 128,
            "lr": 0.4,
            "warmup_epochs": 1,
            "fill_budget": True,
        },
        "scan": {"epochs": 60, "batch_size": 256, "lr": 1e-3, "update_backbone": False},
        "selflabel": {"epochs": 30, "batch_size": 500, "lr": 1e-3},
    },
    # For tests and smoke runs on a few hundred images: a minute on a CPU, not hours.
    "tiny": {
        # float32: tests and smoke runs give the same result on CPUs with and without bf16.
        "precision": "float32",
        "backbone_width": 16,
        "pretext": {"epochs": 25, "batch_size": 64, "lr": 0.3, "warmup_epochs": 2},
        "scan": {"epochs": 12, "batch_size": 64, "lr": 1e-3, "num_heads": 3, "num_neighbors": 10},
        "selflabel": {"epochs": 5, "batch_size": 64, "lr": 1e-4},
    },
}


# Without a K or a range, K is chosen in [2, min(DEFAULT_MAX_CLUSTERS, N / MIN_IMAGES_PER_CLUSTER)].
DEFAULT_MAX_CLUSTERS = 20
MIN_IMAGES_PER_CLUSTER = 10


def default_cluster_range(num_images: int) -> tuple[int, int]:
    """The candidates for K when a request names neither K nor a range: 2 up to a cluster per
    MIN_IMAGES_PER_CLUSTER images, at most DEFAULT_MAX_CLUSTERS."""
    return 2, max(2, min(DEFAULT_MAX_CLUSTERS, num_images // MIN_IMAGES_PER_CLUSTER))


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(preset: str = "paper", **overrides: Any) -> ScanConfig:
    """Build a config from a named preset plus nested overrides.

    `make_config("cpu", num_clusters=5, scan={"epochs": 3})`. Raises ConfigError with a readable
    message for an unknown preset, an unknown key or a value out of range.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = _deep_merge(PRESETS[preset], overrides)
    values["preset"] = preset
    if overrides.get("backbone_weights") is not None and "pretrained_backbone" not in overrides:
        # A backbone file given explicitly replaces the preset's named backbone.
        values["pretrained_backbone"] = None
    try:
        return ScanConfig.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(problems) from None
