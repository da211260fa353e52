"""SimCLR pretext: two augmented views per image, NT-Xent, SGD with cosine decay.

The collection stays a uint8 tensor on the CPU; each step moves one index batch to the device
and augments it there (batched, no per-image work), so the GPU path needs no data loader.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from scan_engine.augment import SimCLRAugment
from scan_engine.config import ScanConfig
from scan_engine.losses import NTXentLoss
from scan_engine.models import ContrastiveModel, build_backbone
from scan_engine.runtime import Runtime
from scan_engine.training import (
    BatchStream,
    Reporter,
    StepPlan,
    cosine_lr,
    device_generator,
    optimizer_step,
)

logger = logging.getLogger(__name__)

__all__ = ["PretextStats", "build_contrastive_model", "run_pretext"]


@dataclass
class PretextStats:
    steps: int
    epochs: float
    final_loss: float | None
    images_per_s: float  # images (not views) per second of training
    wall_s: float


def build_contrastive_model(config: ScanConfig) -> ContrastiveModel:
    backbone = build_backbone(config.backbone, config.backbone_width, config.image_size)
    return ContrastiveModel(backbone, config.pretext.projection_dim)


def run_pretext(
    model: ContrastiveModel,
    images: torch.Tensor,
    config: ScanConfig,
    runtime: Runtime,
    reporter: Reporter,
    generator: torch.Generator,
    budget_s: float | None = None,
) -> PretextStats:
    """Train `model` in place on `images` (N, 3, S, S) uint8 with SimCLR."""
    settings = config.pretext
    num_images = images.shape[0]
    batch_size = min(settings.batch_size, num_images)
    plan = StepPlan(
        settings.epochs, max(1, num_images // batch_size), budget_s, settings.fill_budget
    )
    model = runtime.prepare(model)
    model.train()
    # Full batches only (epoch_batches), so one compiled graph serves every step.
    forward = torch.compile(model) if config.compile else model
    augment = SimCLRAugment(config.image_size, crop_scale_min=settings.crop_scale_min)
    criterion = NTXentLoss(settings.temperature)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    scaler = runtime.grad_scaler()
    warmup = int(settings.warmup_epochs * plan.steps_per_epoch)
    augment_generator = device_generator(runtime.device, generator)
    started = time.monotonic()
    step, loss_value, epoch_losses = 0, None, []
    batches = BatchStream(num_images, batch_size, generator)
    while step < plan.total:
        index = batches.next()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(settings.lr, step, plan.total, warmup)
        batch = runtime.images(images[index])
        view1 = augment(batch, generator=augment_generator)  # (B, 3, S, S) float
        view2 = augment(batch, generator=augment_generator)
        with runtime.autocast():
            projections = forward(torch.cat([view1, view2]))  # (2B, D), one pass for both views
        z1, z2 = projections.chunk(2)
        loss = criterion(z1, z2)
        optimizer_step(optimizer, scaler, loss)
        loss_value = float(loss.detach())
        epoch_losses.append(loss_value)
        plan.after_step(step)
        step += 1
        if plan.epoch_ended(step):
            reporter.log(
                {
                    "stage": "pretext",
                    "step": step,
                    "epoch": round(step / plan.steps_per_epoch, 3),
                    "loss": sum(epoch_losses) / len(epoch_losses),
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
            epoch_losses = []
        reporter.update(
            "pretext", step / max(plan.total, 1), f"step {step}/{plan.total} loss {loss_value:.3f}"
        )
    wall = time.monotonic() - started
    return PretextStats(
        step,
        plan.epochs,
        loss_value,
        plan.steady_rate(batch_size) or (step * batch_size / wall if wall else 0.0),
        wall,
    )
