"""Put new images into the clusters of a finished run, without retraining.

The pipeline's finalize stage writes `model.pt` (format MODEL_FORMAT_VERSION) into the work folder:
the resolved config (image size, backbone), the backbone with the chosen head for every C, how the
heads read the features, the preprocessing, the K selection, and per C the cluster centroids and
radii in feature space (outlier rule) and the neighbour co-assignment matrix (merging).

Prediction: each image is decoded like the training images (shorter side to image_size, centre
crop), normalised with the training mean and std, and run through the backbone: f, the
L2-normalised feature (D,), and p = softmax(head(f)) (C,). cluster = argmax p, confidence = max p.

Outlier rule (format 3): the model keeps up to MAX_OUTLIER_REFERENCE training features. Each
training image's cosine distance to its OUTLIER_NEIGHBORS-th nearest other training image is
measured; the radius is the OUTLIER_QUANTILE (99th percentile) of those distances. A new image is
an outlier when its OUTLIER_NEIGHBORS-th nearest training image is farther than that radius: it
lies where no training images are. About 1 % of images like the training ones are flagged.

Format 2 files have no reference features and keep the older rule: for every non-empty training
cluster j, mu_j is the normalised mean feature of its members and r_j the OUTLIER_QUANTILE of its
members' cosine distances 1 - <f, mu_j> (fewer than MIN_MEMBERS_FOR_OWN_RADIUS members: the same
percentile over all training images); an outlier lies outside every r_j. That rule missed noise
images once the pretext trained longer (SimCLR spreads each cluster over a wide cap of the sphere:
on the generated shapes after 50 SimCLR epochs it flagged 1 of 8 noise images, the neighbour rule
all 8, and 0 of 40 held-back images either way).

`distance` is the cosine distance to the nearest centroid in both formats. A low confidence with a
small distance means "between two clusters", not "unlike anything seen".
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scan_engine.augment import CIFAR10_MEAN, CIFAR10_STD
from scan_engine.config import ScanConfig
from scan_engine.data import ImageCollection
from scan_engine.model_selection import merge_groups, merge_probabilities, neighbor_coassignment
from scan_engine.models import ClusteringModel, FeatureInput, build_backbone
from scan_engine.neighbors import extract_features
from scan_engine.runtime import resolve_runtime
from scan_engine.scan import infer

__all__ = [
    "MODEL_FORMAT_VERSION",
    "MODEL_FILE",
    "OUTLIER_QUANTILE",
    "MIN_MEMBERS_FOR_OWN_RADIUS",
    "OUTLIER_NEIGHBORS",
    "MAX_OUTLIER_REFERENCE",
    "ModelFormatError",
    "Prediction",
    "Predictor",
    "cluster_geometry",
    "neighbor_outlier_reference",
    "kth_neighbor_distance",
    "prediction_state",
    "save_model",
    "find_model_file",
    "load_model",
]

logger = logging.getLogger(__name__)

# 1: weights + config. 2: + head input, preprocessing, cluster geometry, co-assignment, K choice.
# 3: + reference features for the neighbour outlier rule. 5: + backbone_reference on the
# pretrained route (backbone name + weights sha256 + its preprocessing instead of its weights).
MODEL_FORMAT_VERSION = 5
MODEL_FILE = "model.pt"
OUTLIER_QUANTILE = 0.99
OUTLIER_NEIGHBORS = 5
# Kept as float16: 20,000 x 512 features add 20 MB to model.pt.
MAX_OUTLIER_REFERENCE = 20_000
_DISTANCE_BLOCK_ELEMENTS = 2**24  # (queries, references) distances computed per block
MIN_MEMBERS_FOR_OWN_RADIUS = 20
RESIZE_RULE = "shorter side resized to image_size, centre crop (scan_engine.data.decode_image)"


class ModelFormatError(ValueError):
    """A model file that is missing, unreadable, or of a format this code cannot use."""


def cluster_geometry(
    features: torch.Tensor, assignments: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (C, D) unit rows, radius (C,)) of a clustering, as the outlier rule uses them.

    features: (N, D) L2-normalised; assignments: (N,) int64. An empty cluster gets a zero
    centroid and radius -1, so that no image ever lies inside it.
    """
    features = features.float()
    dim = features.shape[1]
    sums = torch.zeros(num_clusters, dim).index_add_(0, assignments, features)  # (C, D)
    centroids = F.normalize(sums, dim=1)  # zero rows stay zero
    own = 1.0 - (features * centroids[assignments]).sum(1)  # (N,) distance to own centroid
    overall = float(torch.quantile(own, OUTLIER_QUANTILE)) if own.numel() else 0.0
    radius = torch.full((num_clusters,), -1.0)
    for cluster in range(num_clusters):
        members = own[assignments == cluster]
        if members.numel() >= MIN_MEMBERS_FOR_OWN_RADIUS:
            radius[cluster] = float(torch.quantile(members, OUTLIER_QUANTILE))
        elif members.numel() > 0:
            radius[cluster] = overall
    return centroids, radius


def kth_neighbor_distance(
    queries: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool = False
) -> torch.Tensor:
    """(Q,) cosine distance from each query to its k-th nearest reference row (unit rows).

    exclude_self: the queries are the reference itself, and a row is not its own neighbour.
    """
    queries, reference = queries.float(), reference.float()
    k = min(k, reference.shape[0] - (1 if exclude_self else 0))
    if k < 1:
        return torch.zeros(queries.shape[0])
    block = max(1, _DISTANCE_BLOCK_ELEMENTS // max(1, reference.shape[0]))
    out = torch.empty(queries.shape[0])
    for start in range(0, queries.shape[0], block):
        distances = 1.0 - queries[start : start + block] @ reference.T  # (b, R)
        if exclude_self:
            rows = torch.arange(distances.shape[0])
            distances[rows, rows + start] = float("inf")
        out[start : start + block] = distances.topk(k, dim=1, largest=False).values[:, -1]
    return out


def neighbor_outlier_reference(features: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """The training side of the neighbour outlier rule: reference features (float16, at most
    MAX_OUTLIER_REFERENCE, a seeded sample beyond that) and the radius their own leave-one-out
    k-th neighbour distances give. features: (N, D) L2-normalised."""
    features = features.float()
    if features.shape[0] > MAX_OUTLIER_REFERENCE:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(features.shape[0], generator=generator)[:MAX_OUTLIER_REFERENCE]
        features = features[keep.sort().values]
    reference = features.half()
    own = kth_neighbor_distance(reference, reference, OUTLIER_NEIGHBORS, exclude_self=True)
    return {
        "features": reference,
        "k": OUTLIER_NEIGHBORS,
        "radius": float(torch.quantile(own, OUTLIER_QUANTILE)) if own.numel() else 0.0,
    }


def prediction_state(
    features: torch.Tensor,
    logits: dict[int, torch.Tensor],
    neighbors: torch.Tensor,
    *,
    heads_on_normalized_features: bool,
    num_clusters: int,
    head_input_scale: float = 1.0,
    k_selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What model.pt keeps besides weights and config, computed on the training images
    (save_model writes it).

    features: (N, D) L2-normalised final features; logits: {C: (1, N, C)} of the kept heads;
    neighbors: (N, K) mined indices.
    """
    clusters: dict[int, dict[str, Any]] = {}
    for c, head_logits in logits.items():
        probabilities = F.softmax(head_logits[0].float(), dim=1)  # (N, C)
        assignments = probabilities.argmax(1)
        centroids, radius = cluster_geometry(features, assignments, c)
        clusters[int(c)] = {
            "centroids": centroids,
            "radius": radius,
            "sizes": torch.bincount(assignments, minlength=c),
            "coassignment": torch.from_numpy(neighbor_coassignment(probabilities, neighbors)),
        }
    return {
        "head_input": "normalized" if heads_on_normalized_features else "raw",
        "head_input_scale": float(head_input_scale),
        "preprocessing": {"resize": RESIZE_RULE, "mean": CIFAR10_MEAN, "std": CIFAR10_STD},
        "num_clusters": int(num_clusters),
        "k_selection": k_selection,
        "outlier_rule": {
            "quantile": OUTLIER_QUANTILE,
            "neighbors": OUTLIER_NEIGHBORS,
        },
        "outlier_reference": neighbor_outlier_reference(features),
        "clusters": clusters,
    }


def save_model(
    path: Path,
    model: ClusteringModel,
    config: ScanConfig,
    prediction: dict[str, Any],
    backbone_reference: dict[str, Any] | None = None,
) -> None:
    """Write model.pt (format MODEL_FORMAT_VERSION): the weights of `model` (the kept head per
    C), the resolved config and `prediction` (prediction_state). On the pretrained route
    `backbone_reference` (name, weights_sha256, preprocessing) stands in for the backbone's
    weights, which stay in the models folder. Write then rename, so that a crash never leaves
    a half-written model behind."""
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            "format_version": MODEL_FORMAT_VERSION,
            "config": config.to_json_dict(),
            "fixed_backbone": config.fixed_backbone,
            "cluster_counts": model.cluster_counts,
            "state_dict": model.state_dict(),
            "backbone_reference": backbone_reference,
            **prediction,
            # The backbone's own normalisation, where one is referenced.
            **(
                {"preprocessing": backbone_reference["preprocessing"]} if backbone_reference else {}
            ),
        },
        temporary,
    )
    os.replace(temporary, path)


@dataclass
class Prediction:
    """Cluster, confidence and outlier flag for each of N new images, for one cluster count."""

    num_clusters: int  # clusters predicted into (k after a merge)
    assignments: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) float32 max probability
    probabilities: np.ndarray  # (N, num_clusters) float32
    distance: np.ndarray | None  # (N,) float32 cosine distance to the nearest centroid
    outlier: np.ndarray | None  # (N,) bool; None when the model file has no cluster geometry
    merged_from: int | None = None  # C of the head, when its clusters were merged
    groups: list[int] | None = None  # merged cluster of each of the C clusters


def find_model_file(path: str | Path) -> Path:
    """model.pt itself, or the one in a work folder or in a `scan-cluster --out` folder."""
    path = Path(path)
    for candidate in (path, path / MODEL_FILE, path / "work" / MODEL_FILE):
        if candidate.is_file():
            return candidate
    raise ModelFormatError(
        f"no model at {path}: give a {MODEL_FILE}, a work folder or a scan-cluster output folder"
    )


class Predictor:
    """A finished run's model, ready to assign new images (see load_model)."""

    def __init__(self, saved: dict[str, Any], path: Path, device: str | None = None) -> None:
        version = saved.get("format_version")
        if version not in (1, 2, 3, 4, MODEL_FORMAT_VERSION):
            raise ModelFormatError(
                f"{path} has model format {version!r}; this version reads 1..{MODEL_FORMAT_VERSION}"
            )
        self.path = path
        self.format_version = int(version)
        self.config = ScanConfig.model_validate(saved["config"])
        self.cluster_counts = [int(c) for c in saved["cluster_counts"]]
        self.num_clusters = int(saved.get("num_clusters", self.config.num_clusters))
        self.k_selection: dict[str, Any] | None = saved.get("k_selection")
        self.clusters: dict[int, dict[str, torch.Tensor]] = saved.get("clusters", {})
        # Format 3; format 2 files flag outliers by the cluster radii instead.
        self.outlier_reference: dict[str, Any] | None = saved.get("outlier_reference")
        # Format 5, pretrained route: the backbone comes from the models folder by name.
        self.backbone_reference: dict[str, Any] | None = saved.get("backbone_reference")
        preprocessing = saved.get("preprocessing")
        if (
            self.backbone_reference is None
            and preprocessing is not None
            and (
                tuple(preprocessing["mean"]) != CIFAR10_MEAN
                or tuple(preprocessing["std"]) != CIFAR10_STD
            )
        ):
            raise ModelFormatError(f"{path} was trained with another normalisation")
        # Format 1 did not record it: heads on a fixed backbone read normalised features.
        default_input = "normalized" if self.config.fixed_backbone else "raw"
        self.head_input = saved.get("head_input", default_input)
        self.pretrained: Any = None  # LoadedBackbone on the pretrained route
        backbone: torch.nn.Module
        if self.backbone_reference is not None:
            self.pretrained = _referenced_backbone(self.backbone_reference, self.config, path)
            backbone = FeatureInput(self.pretrained.spec.feature_dim)
        else:
            backbone = build_backbone(
                self.config.backbone, self.config.backbone_width, self.config.image_size
            )
        # Files written before the scale existed had unscaled heads.
        model = ClusteringModel(
            backbone,
            backbone.feature_dim,  # type: ignore[arg-type]
            self.cluster_counts,
            num_heads=1,
            head_input_scale=float(saved.get("head_input_scale", 1.0)),
        )
        try:
            model.load_state_dict(saved["state_dict"])
        except RuntimeError as error:
            raise ModelFormatError(f"{path}: weights do not fit the config: {error}") from None
        self.runtime = resolve_runtime(device, self.config.precision)
        self.model: ClusteringModel = self.runtime.prepare(model)  # type: ignore[assignment]
        self.model.eval()
        # infer() flips train/eval: one prediction at a time per model (the API shares it).
        self._lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def describe(self) -> dict[str, Any]:
        """What a person needs to know about the model, as JSON."""
        return {
            "path": str(self.path),
            "format_version": self.format_version,
            "image_size": self.image_size,
            "backbone": self.config.backbone,
            "cluster_counts": self.cluster_counts,
            "num_clusters": self.num_clusters,
            "k_selection": self.k_selection,
            "outlier_rule": self._outlier_rule(),
        }

    def _outlier_rule(self) -> str | None:
        if self.outlier_reference is not None:
            k = self.outlier_reference["k"]
            return (
                f"its {k}th nearest training image is farther than for "
                f"{OUTLIER_QUANTILE:.0%} of the training images"
            )
        if self.clusters:
            return (
                f"outside every cluster's radius (the {OUTLIER_QUANTILE:.0%} quantile of its "
                "training members' cosine distance to its centroid)"
            )
        return None

    def _check_count(self, num_clusters: int | None) -> int:
        c = self.num_clusters if num_clusters is None else int(num_clusters)
        if c not in self.cluster_counts:
            raise ValueError(f"the model has no head for C={c}; available: {self.cluster_counts}")
        return c

    def merge_groups(self, num_clusters: int, k: int) -> np.ndarray:
        """(C,) merged cluster in [0, k) of each of the C clusters (see model_selection)."""
        c = self._check_count(num_clusters)
        if c not in self.clusters:
            raise ValueError("this model file predates merging (format 1); rerun the job")
        return merge_groups(self.clusters[c]["coassignment"].numpy(), k)

    def features_and_logits(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """images: (N, 3, S, S) uint8 -> (features (N, D) unit rows, logits {C: (N, C)}), CPU."""
        batch_size = self.config.eval_batch_size
        if self.pretrained is not None:
            from scan_engine.sources import ImageSources

            rows = ImageSources.from_array(images.permute(0, 2, 3, 1).contiguous().numpy())
            return self.features_and_logits_of_sources(rows)
        with self._lock:
            features = None
            if self.head_input == "normalized":
                features = extract_features(
                    self.model.backbone,
                    images,
                    batch_size,
                    self.runtime.device,
                    self.runtime.amp_dtype,
                )
            features, logits = infer(self.model, images, self.runtime, batch_size, features)
            self.model.eval()
        return features, {c: out[0] for c, out in logits.items()}

    def features_and_logits_of_sources(
        self, sources: Any
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Pretrained route: stream ImageSources through the referenced backbone with the
        training preprocessing, then the heads. Items that fail to decode raise ValueError."""
        from scan_engine.embedding import Preprocessing, embed_sources

        assert self.pretrained is not None and self.backbone_reference is not None
        preprocessing = Preprocessing(**self.backbone_reference["preprocessing"])
        with self._lock:
            embedded = embed_sources(
                sources,
                self.pretrained.module,
                preprocessing=preprocessing,
                runtime=self.runtime,
            )
            if len(embedded) != len(sources):
                reasons = "; ".join(f"{s.path}: {s.reason}" for s in embedded.skipped)
                raise ValueError(f"images that could not be read: {reasons}")
            features = F.normalize(embedded.features.float(), dim=1)
            features, logits = infer(
                self.model, features, self.runtime, self.config.eval_batch_size, features
            )
            self.model.eval()
        return features, {c: out[0] for c, out in logits.items()}

    def predict(
        self,
        images: ImageCollection | torch.Tensor,
        num_clusters: int | None = None,
        merge_to: int | None = None,
    ) -> Prediction:
        """Assign (N, 3, S, S) uint8 images (or a collection) to the clusters of C = num_clusters
        (default: the run's K), merged down to `merge_to` clusters when given."""
        tensor = images.images if isinstance(images, ImageCollection) else images
        if tensor.ndim != 4 or tensor.shape[1] != 3 or tensor.dtype != torch.uint8:
            raise ValueError(f"images must be (N, 3, S, S) uint8, got {tuple(tensor.shape)}")
        if self.pretrained is None and (
            tensor.shape[-1] != self.image_size or tensor.shape[-2] != self.image_size
        ):
            raise ValueError(f"images are {tensor.shape[-1]} px; the model takes {self.image_size}")
        c = self._check_count(num_clusters)
        groups = None
        if merge_to is not None and merge_to != c:
            groups = self.merge_groups(c, merge_to)
        features, logits = self.features_and_logits(tensor)
        probabilities = F.softmax(logits[c].float(), dim=1)  # (N, C)
        distance = outlier = None
        if c in self.clusters:
            geometry = self.clusters[c]
            distances = 1.0 - features.float() @ geometry["centroids"].float().T  # (N, C)
            distance = distances.min(1).values.numpy().astype(np.float32)
            if self.outlier_reference is None:  # format 2: the cluster-radius rule
                outside = distances > geometry["radius"].float()  # (N, C); empty: always
                outlier = outside.all(1).numpy()
        if self.outlier_reference is not None:
            reference = self.outlier_reference
            kth = kth_neighbor_distance(features, reference["features"], int(reference["k"]))
            outlier = (kth > float(reference["radius"])).numpy()
        if groups is not None:
            probabilities = merge_probabilities(probabilities, groups)  # (N, k)
        confidence, assignments = probabilities.max(1)
        return Prediction(
            num_clusters=int(probabilities.shape[1]),
            assignments=assignments.numpy().astype(np.int64),
            confidence=confidence.numpy().astype(np.float32),
            probabilities=probabilities.numpy().astype(np.float32),
            distance=distance,
            outlier=outlier,
            merged_from=c if groups is not None else None,
            groups=None if groups is None else [int(g) for g in groups],
        )


def _referenced_backbone(reference: dict[str, Any], config: ScanConfig, path: Path) -> Any:
    """The pretrained backbone model.pt names, with the very weights the run used."""
    from scan_engine.backbones import load_backbone

    loaded = load_backbone(reference["name"], models_dir=config.models_dir)
    if loaded.weights_sha256 != reference["weights_sha256"]:
        raise ModelFormatError(
            f"{path} was trained on {reference['name']} weights "
            f"{reference['weights_sha256'][:12]}…, but {loaded.weights_origin} holds "
            f"{loaded.weights_sha256[:12]}…: import the same weights (scan-weights import)"
        )
    return loaded


def load_model(path: str | Path, device: str | None = None) -> Predictor:
    """Load model.pt (or the one in a work / scan-cluster output folder) for prediction.

    Raises ModelFormatError when there is no model there or it cannot be read.
    """
    file = find_model_file(path)
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise many types
        raise ModelFormatError(f"cannot read the model {file}: {error}") from None
    if not isinstance(saved, dict) or "state_dict" not in saved or "config" not in saved:
        raise ModelFormatError(f"{file} is not a model written by the pipeline")
    predictor = Predictor(saved, file, device)
    logger.info("model loaded from %s (format %d)", file, predictor.format_version)
    return predictor
