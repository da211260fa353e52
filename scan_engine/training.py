"""What every training stage shares: progress reporting, the stop flag, the time budget and the
learning-rate schedule, so that pretext, SCAN and self-labeling loops stay short and alike."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scan_engine.results import ProgressEvent, StopRequested

logger = logging.getLogger(__name__)

__all__ = [
    "Reporter",
    "StepPlan",
    "BatchStream",
    "cosine_lr",
    "device_generator",
    "epoch_batches",
    "head_parameters",
    "optimizer_step",
]


class Reporter:
    """Turns per-stage progress into whole-run progress + ETA, and checks the stop flag.

    `weights` gives each stage's expected share of the run's time; ETA is extrapolated from the
    time spent so far over the fraction done, which is honest once a stage has run a few steps.
    """

    def __init__(
        self,
        weights: dict[str, float],
        callback: Callable[[ProgressEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        log_path: Path | None = None,
        min_interval_s: float = 0.5,
    ) -> None:
        total = sum(weights.values())
        self.weights = {stage: w / total for stage, w in weights.items()}
        self.callback = callback
        self.should_stop = should_stop
        self.log_path = log_path
        self.min_interval_s = min_interval_s
        self.started = time.monotonic()
        self._last_emit = float("-inf")
        self._done_before: dict[str, float] = {}

    def _offset(self, stage: str) -> float:
        offset = 0.0
        for name, weight in self.weights.items():
            if name == stage:
                break
            offset += weight
        return offset

    def update(
        self, stage: str, stage_fraction: float, message: str = "", force: bool = False
    ) -> None:
        """Report progress within `stage`; raises StopRequested when the caller asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise StopRequested(f"stopped during {stage}")
        now = time.monotonic()
        if not force and now - self._last_emit < self.min_interval_s:
            return
        self._last_emit = now
        stage_fraction = min(max(stage_fraction, 0.0), 1.0)
        fraction = self._offset(stage) + self.weights.get(stage, 0.0) * stage_fraction
        elapsed = now - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
        if self.callback is not None:
            self.callback(ProgressEvent(stage, stage_fraction, fraction, eta, message))

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (per-epoch metrics) to the run's log file."""
        logger.info("%s", record)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as log_file:
                log_file.write(json.dumps(record) + "\n")


class StepPlan:
    """How many optimiser steps a stage runs: its epochs, fitted to a time budget.

    The first steps are timed (after one warm-up step) and the total is cut so that the stage
    ends within its budget; with `fill_budget` the total also grows to use the whole budget, so
    the epochs only apply when no budget is given. The estimate is renewed at every epoch's end
    (steps can slow down over a long run). The cosine schedule follows `total`, so it still
    decays to its end.
    """

    def __init__(
        self,
        epochs: float,
        steps_per_epoch: int,
        budget_s: float | None,
        fill_budget: bool = False,
    ) -> None:
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = max(0, int(round(epochs * self.steps_per_epoch)))
        self.budget_s = budget_s
        self.fill_budget = fill_budget and budget_s is not None and self.total > 0
        self._timing_start: float | None = None
        self._started = time.monotonic()
        self._last_step_end = self._started
        self._steps_done = 0

    def after_step(self, step: int) -> None:
        """Call after finishing step `step` (0-based)."""
        now = time.monotonic()
        if step == 0:  # the first step pays one-off costs (allocations, kernel choice)
            self._timing_start = now
        self._last_step_end = now
        self._steps_done = step + 1
        if self.budget_s is None or self._timing_start is None:
            return
        if step == 3 or (step > 3 and self.epoch_ended(step + 1)):
            self._fit_to_budget(step, now)

    def _fit_to_budget(self, step: int, now: float) -> None:
        assert self.budget_s is not None and self._timing_start is not None
        per_step = (now - self._timing_start) / step
        remaining = self.budget_s - (now - self._started)
        affordable = step + 1 + int(max(remaining, 0.0) / per_step)
        if affordable < self.total or (self.fill_budget and affordable > self.total):
            if abs(affordable - self.total) > 0.01 * self.total:
                logger.info("time budget: %d steps planned (was %d)", affordable, self.total)
            self.total = affordable

    def steady_rate(self, items_per_step: int) -> float:
        """Items per second after the first (warm-up) step; 0 when fewer than 2 steps ran."""
        if self._timing_start is None or self._steps_done < 2:
            return 0.0
        elapsed = self._last_step_end - self._timing_start
        return (self._steps_done - 1) * items_per_step / elapsed if elapsed > 0 else 0.0

    def epoch_ended(self, steps_done: int) -> bool:
        """True after the last step of an epoch or of the whole plan (time to log)."""
        return steps_done % self.steps_per_epoch == 0 or steps_done == self.total

    @property
    def epochs(self) -> float:
        return self.total / self.steps_per_epoch


def cosine_lr(
    base_lr: float, step: int, total: int, warmup: int = 0, final_ratio: float = 1e-3
) -> float:
    """Linear warm-up then cosine decay from base_lr to base_lr·final_ratio."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = base_lr * final_ratio
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def epoch_batches(
    num_items: int, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """A shuffled epoch as index batches; the last short batch is dropped (BN and NT-Xent want
    full batches) unless it would be the only one."""
    order = torch.randperm(num_items, generator=generator)
    batch_size = min(batch_size, num_items)
    full = num_items // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(max(1, full))]


def device_generator(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """A generator on `device` (for augmentations there), seeded from the run's CPU generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    on_device = torch.Generator(device=device)
    on_device.manual_seed(seed)
    return on_device


class BatchStream:
    """Index batches across epochs: each epoch a new shuffle (see epoch_batches)."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.generator = generator
        self._pending: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        if not self._pending:
            self._pending = epoch_batches(self.num_items, self.batch_size, self.generator)
        return self._pending.pop(0)


def head_parameters(model: torch.nn.Module, heads_only: bool) -> list[torch.nn.Parameter]:
    """What the optimiser updates: only the heads (on cached features), else all trainable."""
    if heads_only:
        model.backbone.requires_grad_(False)  # type: ignore[operator]
        return list(model.heads.parameters())  # type: ignore[operator]
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor
) -> None:
    """Backward + step with the runtime's grad scaler (a no-op scaler outside fp16)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
