"""SCAN and self-labeling on fixed features (the pretrained route): linear heads only, seconds on
a CPU, and a result that never ends with clusters the model did not choose to leave empty.

1. SCAN step: `num_heads` linear heads on the L2-normalised features times `feature_scale`,
   trained together as one batched matrix product (paper loss: neighbours agree, entropy of the
   mean prediction). The neighbour side sees a feature-space augmentation (Gaussian noise on the
   unit sphere), since a product run has no time for augmented views of the images.
2. Head selection: the head that agrees most with the other heads (Hungarian-aligned agreement,
   the medoid of the heads), not the lowest SCAN loss: on CIFAR-10 features the loss picked a
   head near the bottom of the range, while the consensus head sits at or above the median.
3. Self-labeling: the chosen head's confident predictions (above `selflabel_threshold`) become
   labels for the augmented view, weighted inversely to each cluster's share
   (`ConfidenceCrossEntropy`).
4. Guard: the self-labeled head is kept only when it leaves no more (nearly) empty clusters
   than the SCAN head and does not lower the label-free consistency κ
   (`model_selection.score_candidate`); otherwise the SCAN head is kept and the stats say why.
5. Calibration: one softmax temperature fitted to the other heads' clusters
   (`scan_engine.calibration`), folded into the kept head's weights, so that prediction and the
   shown confidence agree.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scan_engine.calibration import align_clusters, fit_temperature
from scan_engine.losses import ConfidenceCrossEntropy, SCANLoss
from scan_engine.model_selection import SMALL_CLUSTER_SHARE, head_consensus, score_candidate
from scan_engine.scan import augment_features, head_losses, sample_neighbors

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureHeadsSettings",
    "FeatureClustering",
    "cluster_features",
    "keep_selflabel",
    "augment_features",
]


@dataclass(frozen=True)
class FeatureHeadsSettings:
    """Defaults measured on CIFAR-10 with EfficientNet-Lite0 features (benchmarks/
    pretrained_heads_cifar10.json)."""

    num_heads: int = 10
    steps: int = 1500  # SCAN optimiser steps; ~1 s per 100 on one busy core
    batch_size: int = 256
    lr: float = 1e-3  # Adam; heads on fixed features tolerate 10x the paper's 1e-4
    weight_decay: float = 1e-4
    entropy_weight: float = 5.0
    feature_scale: float = 20.0  # unit-norm features times this: a softmax sharp enough to trust
    augment_noise: float = 0.5  # feature-space augmentation: noise norm relative to the feature
    head_selection: str = "consensus"  # or "loss" (paper: lowest SCAN loss)
    selflabel_steps: int = 300
    selflabel_batch_size: int = 1000
    selflabel_lr: float = 1e-3
    selflabel_threshold: float = 0.99


@dataclass
class FeatureClustering:
    """The kept head (temperature folded in) and what it gives on the collection."""

    weight: torch.Tensor  # (D, C): logits = feature_scale * features @ weight + bias
    bias: torch.Tensor  # (C,)
    feature_scale: float
    temperature: float  # already divided out of weight and bias
    probabilities: torch.Tensor  # (N, C) calibrated
    assignments: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) float32 calibrated max-probability
    final_stage: str  # "scan" or "selflabel"
    scan_assignments: np.ndarray  # (N,) the SCAN head's clusters, for comparison
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def non_empty_clusters(self) -> int:
        return int(np.unique(self.assignments).size)


def _train_scan_heads(
    x: torch.Tensor,
    neighbors: torch.Tensor,
    num_clusters: int,
    settings: FeatureHeadsSettings,
    generator: torch.Generator,
    progress: Callable[[str, float], None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, D, C) weights and (H, 1, C) biases of the SCAN heads, trained as one batched product."""
    num_images, dim = x.shape
    bound = 1.0 / math.sqrt(dim)  # nn.Linear's initialisation
    heads = settings.num_heads
    weight = torch.empty(heads, dim, num_clusters).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(heads, 1, num_clusters).uniform_(-bound, bound, generator=generator)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=settings.lr, weight_decay=settings.weight_decay)
    criterion = SCANLoss(settings.entropy_weight)
    batch_size = min(settings.batch_size, num_images)
    for step in range(settings.steps):
        if progress is not None and step % 50 == 0:
            progress("scan", step / settings.steps)
        index = torch.randperm(num_images, generator=generator)[:batch_size]
        neighbor = augment_features(
            x[sample_neighbors(neighbors, index, generator)], settings.augment_noise, generator
        )
        anchor_logits = settings.feature_scale * x[index] @ weight + bias  # (H, B, C)
        neighbor_logits = settings.feature_scale * neighbor @ weight + bias
        loss = criterion(anchor_logits, neighbor_logits)[0].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()


def _selflabel_head(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    settings: FeatureHeadsSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Self-label one head ((D, C), (C,)), starting from the SCAN head; returns the trained head
    and the confident samples of the last step."""
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    optimizer = torch.optim.Adam(
        [weight, bias], lr=settings.selflabel_lr, weight_decay=settings.weight_decay
    )
    criterion = ConfidenceCrossEntropy(settings.selflabel_threshold)
    num_images = x.shape[0]
    batch_size = min(settings.selflabel_batch_size, num_images)
    confident = 0
    for _ in range(settings.selflabel_steps):
        index = torch.randperm(num_images, generator=generator)[:batch_size]
        with torch.no_grad():
            weak = settings.feature_scale * x[index] @ weight + bias  # (B, C)
        view = augment_features(x[index], settings.augment_noise, generator)
        strong = settings.feature_scale * view @ weight + bias
        loss, confident = criterion(weak, strong)
        if loss is None:
            break  # nothing confident: the guard keeps the SCAN head
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach(), confident


def _small_clusters(assignments: np.ndarray, num_clusters: int) -> int:
    sizes = np.bincount(assignments, minlength=num_clusters)
    return int((sizes < SMALL_CLUSTER_SHARE * assignments.size / num_clusters).sum())


def keep_selflabel(
    scan_assignments: np.ndarray,
    scan_consistency: float,
    selflabel_assignments: np.ndarray,
    selflabel_consistency: float,
    num_clusters: int,
) -> tuple[bool, str]:
    """The collapse guard: (keep the self-labeled head?, why). It is kept only when it leaves no
    more (nearly) empty clusters than SCAN and does not lower the neighbour consistency κ."""
    small_before = _small_clusters(scan_assignments, num_clusters)
    small_after = _small_clusters(selflabel_assignments, num_clusters)
    if small_after > small_before:
        return False, (
            f"self-labeling left {small_after} (nearly) empty clusters against "
            f"{small_before} after SCAN; the SCAN result is kept"
        )
    if selflabel_consistency < scan_consistency:
        return False, (
            f"self-labeling lowered the neighbour consistency ({selflabel_consistency:.3f} < "
            f"{scan_consistency:.3f}); the SCAN result is kept"
        )
    return True, "self-labeled head kept"


def cluster_features(
    features: torch.Tensor,
    neighbors: torch.Tensor,
    num_clusters: int,
    settings: FeatureHeadsSettings | None = None,
    seed: int = 0,
    selflabel: bool = True,
    progress: Callable[[str, float], None] | None = None,
) -> FeatureClustering:
    """SCAN heads, head selection, self-labeling, the collapse guard and calibration on fixed
    features. features: (N, D) (normalised here); neighbors: (N, K) mined on those features."""
    settings = settings or FeatureHeadsSettings()
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(features.float(), dim=1)
    neighbors = neighbors.long()
    timings: dict[str, float] = {}
    started = time.monotonic()
    weights, biases = _train_scan_heads(x, neighbors, num_clusters, settings, generator, progress)
    with torch.no_grad():
        logits = settings.feature_scale * x @ weights + biases  # (H, N, C)
    head_predictions = logits.argmax(-1).numpy()  # (H, N)
    timings["scan"] = time.monotonic() - started

    started = time.monotonic()
    consensus = head_consensus(head_predictions, num_clusters)
    losses = head_losses({num_clusters: logits}, neighbors, settings.entropy_weight)[num_clusters]
    if settings.head_selection == "consensus":
        chosen = int(np.argmax(consensus))
    elif settings.head_selection == "loss":
        chosen = int(np.argmin(losses))
    else:
        raise ValueError(f"unknown head selection {settings.head_selection!r}")
    scan_weight, scan_bias = weights[chosen], biases[chosen, 0]
    scan_logits = logits[chosen]  # (N, C)
    scan_assignments = scan_logits.argmax(1).numpy()
    scan_score = score_candidate(F.softmax(scan_logits, 1), neighbors, x, seed)
    timings["select"] = time.monotonic() - started

    started = time.monotonic()
    final_stage, note = "scan", "self-labeling disabled"
    weight, bias, final_logits = scan_weight, scan_bias, scan_logits
    selflabel_stats: dict[str, Any] = {}
    if selflabel:
        sl_weight, sl_bias, confident = _selflabel_head(
            x, scan_weight, scan_bias, settings, generator
        )
        with torch.no_grad():
            sl_logits = settings.feature_scale * x @ sl_weight + sl_bias
        sl_assignments = sl_logits.argmax(1).numpy()
        sl_score = score_candidate(F.softmax(sl_logits, 1), neighbors, x, seed)
        keep, note = keep_selflabel(
            scan_assignments,
            scan_score.consistency,
            sl_assignments,
            sl_score.consistency,
            num_clusters,
        )
        selflabel_stats = {
            "confident_last_batch": confident,
            "consistency": round(sl_score.consistency, 4),
            "small_clusters": _small_clusters(sl_assignments, num_clusters),
            "non_empty_clusters": int(np.unique(sl_assignments).size),
        }
        if keep:
            final_stage = "selflabel"
            weight, bias, final_logits = sl_weight, sl_bias, sl_logits
    timings["selflabel"] = time.monotonic() - started

    # Calibrate on the other heads' clusters, aligned to the kept head's.
    final_assignments = final_logits.argmax(1).numpy()
    others = [h for h in range(settings.num_heads) if h != chosen]
    if others:
        references = np.stack(
            [
                align_clusters(final_assignments, head_predictions[h], num_clusters)[
                    head_predictions[h]
                ]
                for h in others
            ],
            axis=1,
        )  # (N, H-1)
    else:
        references = neighbors.numpy()[:, :]  # no other head: neighbours' clusters
        references = final_assignments[references]
    temperature = fit_temperature(final_logits, torch.from_numpy(references))
    probabilities = F.softmax(final_logits / temperature, dim=1)
    confidence, assignments = probabilities.max(1)
    assignments_np = assignments.numpy().astype(np.int64)
    stats = {
        "chosen_head": chosen,
        "head_selection": settings.head_selection,
        "head_consensus": [round(float(v), 4) for v in consensus],
        "head_losses": [round(float(v), 4) for v in losses],
        "head_assignments": head_predictions,  # (H, N), for benchmarks; not JSON
        "scan_consistency": round(scan_score.consistency, 4),
        "scan_non_empty_clusters": int(np.unique(scan_assignments).size),
        "selflabel": selflabel_stats,
        "final_stage": final_stage,
        "note": note,
        "temperature": round(temperature, 4),
        "mean_confidence": round(float(confidence.mean()), 4),
        "non_empty_clusters": int(np.unique(assignments_np).size),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    logger.info("feature heads: %s", stats)
    return FeatureClustering(
        weight=weight / temperature,
        bias=bias / temperature,
        feature_scale=settings.feature_scale,
        temperature=temperature,
        probabilities=probabilities,
        assignments=assignments_np,
        confidence=confidence.numpy().astype(np.float32),
        final_stage=final_stage,
        scan_assignments=scan_assignments.astype(np.int64),
        stats=stats,
    )
