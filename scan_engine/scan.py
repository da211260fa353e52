"""SCAN clustering step: an image and a mined neighbour should get the same cluster, and the
mean prediction should stay spread over all clusters (paper section 3.2).

Two routes: the backbone is fine-tuned on strongly augmented images (paper, small images), or
it is fixed and only the heads train on cached features (fast, also on a CPU).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from scan_engine.augment import StrongAugment, normalize
from scan_engine.config import ScanConfig
from scan_engine.losses import SCANLoss, entropy
from scan_engine.model_selection import head_consensus
from scan_engine.models import ClusteringModel
from scan_engine.runtime import Runtime
from scan_engine.training import (
    BatchStream,
    Reporter,
    StepPlan,
    device_generator,
    head_parameters,
    optimizer_step,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ScanStats",
    "run_scan",
    "infer",
    "head_losses",
    "sample_neighbors",
    "augment_features",
]


@dataclass
class ScanStats:
    steps: int
    epochs: float
    images_per_s: float  # anchor images per second of training
    wall_s: float
    head_losses: dict[int, list[float]] = field(default_factory=dict)  # C -> loss per head
    chosen_heads: dict[int, int] = field(default_factory=dict)  # C -> index of the kept head
    # C -> each head's mean agreement with the others (scan.head_selection "consensus")
    head_consensus: dict[int, list[float]] = field(default_factory=dict)


def sample_neighbors(
    neighbors: torch.Tensor, index: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """One neighbour per anchor, drawn uniformly from its K mined neighbours. (B,) indices."""
    choice = torch.randint(0, neighbors.shape[1], (index.shape[0],), generator=generator)
    return neighbors[index, choice]


def augment_features(
    features: torch.Tensor, noise: float, generator: torch.Generator
) -> torch.Tensor:
    """A feature-space view: Gaussian noise of relative norm `noise`, back on the unit sphere.
    features: (B, D) unit rows (any device; `generator` is a CPU one)."""
    if noise <= 0:
        return features
    direction = torch.randn(features.shape, generator=generator) / math.sqrt(features.shape[1])
    return F.normalize(features + noise * direction.to(features.device), dim=1)


def run_scan(
    model: ClusteringModel,
    images: torch.Tensor,
    neighbors: torch.Tensor,
    config: ScanConfig,
    runtime: Runtime,
    reporter: Reporter,
    generator: torch.Generator,
    budget_s: float | None = None,
    features: torch.Tensor | None = None,
) -> ScanStats:
    """Train `model` in place, then keep one head per cluster count: the lowest loss, or with
    scan.head_selection "consensus" the head the others agree with most.

    images: (N, 3, S, S) uint8; neighbors: (N, K) int64. With `features` (N, D) given, the
    backbone stays fixed and the heads train on those cached features instead of images.
    """
    settings = config.scan
    num_images = images.shape[0]
    batch_size = min(settings.batch_size, num_images)
    plan = StepPlan(settings.epochs, max(1, num_images // batch_size), budget_s)
    on_cached_features = features is not None
    model = runtime.prepare(model)
    parameters = head_parameters(model, heads_only=on_cached_features)
    if features is not None:
        features = features.to(runtime.device)
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = runtime.grad_scaler()
    criterion = SCANLoss(settings.entropy_weight)
    augment = StrongAugment(config.image_size)
    augment_generator = device_generator(runtime.device, generator)
    model.train()
    started = time.monotonic()
    step = 0
    running: list[float] = []
    batches = BatchStream(num_images, batch_size, generator)
    while step < plan.total:
        index = batches.next()
        neighbor_index = sample_neighbors(neighbors, index, generator)
        if on_cached_features:
            assert features is not None
            neighbor_features = augment_features(
                features[neighbor_index.to(runtime.device)], settings.feature_noise, generator
            )
            both = model.forward_heads(
                torch.cat([features[index.to(runtime.device)], neighbor_features])
            )
        else:
            batch = runtime.images(torch.cat([images[index], images[neighbor_index]]))
            views = (
                augment(batch, generator=augment_generator)
                if settings.augment
                else normalize(batch)
            )
            with runtime.autocast():
                both = model(views)  # {C: (H, 2B, C)}: anchors and neighbours in one pass
        total = torch.zeros((), device=runtime.device)
        for logits in both.values():
            anchor_logits, neighbor_logits = logits.chunk(2, dim=1)
            loss, _, _ = criterion(anchor_logits, neighbor_logits)
            total = total + loss.sum()
        optimizer_step(optimizer, scaler, total)
        running.append(float(total.detach()))
        plan.after_step(step)
        step += 1
        if plan.epoch_ended(step):
            reporter.log(
                {
                    "stage": "scan",
                    "step": step,
                    "epoch": round(step / plan.steps_per_epoch, 3),
                    "loss": sum(running) / len(running),
                }
            )
            running = []
        reporter.update("scan", 0.95 * step / max(plan.total, 1), f"step {step}/{plan.total}")
    wall = time.monotonic() - started

    # Head selection on the data without augmentation (paper: lowest total SCAN loss).
    _, logits = infer(model, images, runtime, config.eval_batch_size, features=features)
    losses = head_losses(logits, neighbors, settings.entropy_weight)
    consensus = {
        c: [round(float(v), 4) for v in head_consensus(logits[c].argmax(-1).numpy(), c)]
        for c in logits
    }
    if settings.head_selection == "consensus":
        chosen = {c: int(np.argmax(values)) for c, values in consensus.items()}
    else:
        chosen = {c: int(torch.tensor(values).argmin()) for c, values in losses.items()}
    model.keep_heads(chosen)
    reporter.update("scan", 1.0, "heads selected", force=True)
    logger.info("SCAN heads chosen %s (losses %s)", chosen, losses)
    return ScanStats(
        step,
        plan.epochs,
        plan.steady_rate(batch_size) or (step * batch_size / wall if wall else 0.0),
        wall,
        losses,
        chosen,
        consensus,
    )


@torch.inference_mode()
def infer(
    model: ClusteringModel,
    images: torch.Tensor,
    runtime: Runtime,
    batch_size: int,
    features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One eval pass: L2-normalised backbone features (N, D) and logits {C: (H, N, C)} on CPU.

    With cached `features`, only the heads run and the features come back normalised.
    """
    model.eval()
    all_features: list[torch.Tensor] = []
    all_logits: dict[int, list[torch.Tensor]] = {c: [] for c in model.cluster_counts}
    for start in range(0, images.shape[0], batch_size):
        if features is not None:
            batch_features = features[start : start + batch_size].to(runtime.device).float()
        else:
            batch = runtime.images(images[start : start + batch_size])
            with runtime.autocast():
                batch_features = model.backbone(normalize(batch)).float()
        with runtime.no_amp():
            outputs = model.forward_heads(batch_features)
        all_features.append(F.normalize(batch_features, dim=1).cpu())
        for c, logits in outputs.items():
            all_logits[c].append(logits.float().cpu())
    model.train()
    return torch.cat(all_features), {c: torch.cat(parts, dim=1) for c, parts in all_logits.items()}


def head_losses(
    logits: dict[int, torch.Tensor],
    neighbors: torch.Tensor,
    entropy_weight: float,
    chunk: int = 4096,
) -> dict[int, list[float]]:
    """Total SCAN loss per head over all (image, mined neighbour) pairs. {C: [loss per head]}"""
    losses: dict[int, list[float]] = {}
    for c, head_logits in logits.items():
        probabilities = F.softmax(head_logits, dim=-1)  # (H, N, C)
        num_images = probabilities.shape[1]
        consistency = torch.zeros(probabilities.shape[0])
        for start in range(0, num_images, chunk):
            anchor = probabilities[:, start : start + chunk]  # (H, b, C)
            neighbor = probabilities[:, neighbors[start : start + chunk]]  # (H, b, K, C)
            agreement = (anchor.unsqueeze(2) * neighbor).sum(-1)  # (H, b, K)
            consistency += -torch.log(agreement.clamp_min(1e-8)).sum((1, 2))
        consistency /= num_images * neighbors.shape[1]
        spread = entropy(probabilities.mean(1))  # (H,)
        losses[c] = (consistency - entropy_weight * spread).tolist()
    return losses
