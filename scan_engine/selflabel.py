"""Self-labeling (paper section 3.3): confident predictions on the plain image become labels for
a strongly augmented view; stops when the number of confident samples stops growing.

Batches with no confident sample are skipped. If no sample is ever confident, the caller keeps
the SCAN result and the report says why, instead of crashing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from scan_engine.augment import StrongAugment, normalize
from scan_engine.config import ScanConfig
from scan_engine.losses import ConfidenceCrossEntropy
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

__all__ = ["SelfLabelStats", "run_selflabel"]


@dataclass
class SelfLabelStats:
    steps: int
    epochs: float
    images_per_s: float
    wall_s: float
    confident_per_epoch: list[int]  # confident samples seen in each epoch (summed over C)
    skipped_batches: int  # batches where no sample was confident for any C
    stopped_early: bool  # the confident count plateaued before the planned epochs ended

    @property
    def trained(self) -> bool:
        return any(self.confident_per_epoch)


def run_selflabel(
    model: ClusteringModel,
    images: torch.Tensor,
    config: ScanConfig,
    runtime: Runtime,
    reporter: Reporter,
    generator: torch.Generator,
    budget_s: float | None = None,
    features: torch.Tensor | None = None,
    augmented_features: torch.Tensor | None = None,
) -> SelfLabelStats:
    """Fine-tune `model` (one head per C, after head selection) in place on its own labels.

    On cached features: `features` (N, D) are the weak views and `augmented_features`
    (V, N, D) cached features of V strongly augmented views; only the heads train.
    """
    settings = config.selflabel
    num_images = images.shape[0]
    batch_size = min(settings.batch_size, num_images)
    plan = StepPlan(settings.epochs, max(1, num_images // batch_size), budget_s)
    on_cached_features = features is not None
    model = runtime.prepare(model)
    parameters = head_parameters(model, heads_only=on_cached_features)
    if on_cached_features:
        assert features is not None and augmented_features is not None
        features = features.to(runtime.device)
        augmented_features = augmented_features.to(runtime.device)
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = runtime.grad_scaler()
    criterion = ConfidenceCrossEntropy(settings.threshold)
    augment = StrongAugment(config.image_size)
    augment_generator = device_generator(runtime.device, generator)
    model.train()
    started = time.monotonic()
    step, skipped, confident_in_epoch = 0, 0, 0
    confident_per_epoch: list[int] = []
    best_confident, epochs_without_gain, stopped_early = -1, 0, False
    batches = BatchStream(num_images, batch_size, generator)
    while step < plan.total:
        index = batches.next()
        if on_cached_features:
            assert features is not None and augmented_features is not None
            device_index = index.to(runtime.device)
            view = int(torch.randint(0, augmented_features.shape[0], (1,), generator=generator))
            with torch.no_grad():
                weak = model.forward_heads(features[device_index])
            strong = model.forward_heads(augmented_features[view, device_index])
        else:
            batch = runtime.images(images[index])
            with torch.no_grad(), runtime.autocast():
                weak = model(normalize(batch))  # {C: (1, B, C)}
            with runtime.autocast():
                strong = model(augment(batch, generator=augment_generator))
        total: torch.Tensor | None = None
        for c in weak:
            loss, count = criterion(weak[c][0], strong[c][0])
            confident_in_epoch += count
            if loss is not None:
                total = loss if total is None else total + loss
        if total is None:
            skipped += 1
        else:
            optimizer_step(optimizer, scaler, total)
        plan.after_step(step)
        step += 1
        if plan.epoch_ended(step):
            confident_per_epoch.append(confident_in_epoch)
            reporter.log(
                {
                    "stage": "selflabel",
                    "step": step,
                    "epoch": round(step / plan.steps_per_epoch, 3),
                    "confident": confident_in_epoch,
                    "skipped_batches": skipped,
                }
            )
            if confident_in_epoch > best_confident:
                best_confident, epochs_without_gain = confident_in_epoch, 0
            else:
                epochs_without_gain += 1
            confident_in_epoch = 0
            if confident_per_epoch[-1] == 0 and len(confident_per_epoch) == 1:
                logger.warning("self-labeling: no confident sample in the first epoch; stopping")
                break
            if epochs_without_gain >= settings.plateau_patience:
                stopped_early = step < plan.total
                break
        reporter.update("selflabel", step / max(plan.total, 1), f"step {step}/{plan.total}")
    wall = time.monotonic() - started
    return SelfLabelStats(
        step,
        step / plan.steps_per_epoch,
        plan.steady_rate(batch_size) or (step * batch_size / wall if wall else 0.0),
        wall,
        confident_per_epoch,
        skipped,
        stopped_early,
    )
