"""Small generated collections and a run context for testing one stage at a time (seconds each).

`colour_collection`: three classes of flat-coloured images with pixel noise, so that the mean
colour of an image (MeanColour, a real embedding) separates the classes perfectly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from scan_engine.config import ScanConfig, make_config
from scan_engine.data import ImageCollection, from_arrays
from scan_engine.pipeline import stages_for
from scan_engine.runtime import resolve_runtime
from scan_engine.stages.base import Budget, RunContext
from scan_engine.training import Reporter

CLASSES = 3
PER_CLASS = 12
IMAGE_SIZE = 16
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 60, 230))

# Fast settings on top of the tiny preset: a narrow backbone, one SimCLR epoch, a few steps.
FAST = {
    "image_size": IMAGE_SIZE,
    "backbone_width": 8,
    "pretext": {"epochs": 1, "batch_size": 16},
    "scan": {"epochs": 3, "batch_size": 16, "num_neighbors": 5},
    "selflabel": {"epochs": 2, "batch_size": 16},
    "k_selection": {"steps": 60, "batch_size": 32},
}


def colour_images(per_class: int = PER_CLASS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 flat colours + noise, class-major; (N,) labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(COLOURS):
        base = np.broadcast_to(
            np.array(colour, dtype=np.int16), (per_class, IMAGE_SIZE, IMAGE_SIZE, 3)
        )
        noisy = base + rng.integers(-20, 21, base.shape)
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        labels += [label] * per_class
    return np.concatenate(images), np.array(labels, dtype=np.int64)


@pytest.fixture
def colour_collection() -> ImageCollection:
    images, labels = colour_images()
    return from_arrays(images, labels, class_names=["red", "green", "blue"])


class MeanColour(nn.Module):
    """(B, 3, S, S) normalised images -> (B, 3) mean colour plus a constant: a fixed embedding
    whose neighbours are exactly the images of the same colour."""

    feature_dim = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3))  # (B, 3)
        return torch.cat([mean, torch.ones_like(mean[:, :1])], dim=1)


ContextFactory = Callable[..., RunContext]


@pytest.fixture
def make_context(tmp_path: Path) -> ContextFactory:
    """make_context(collection, config=None, **overrides) -> a RunContext on the CPU, float32."""

    def build(
        collection: ImageCollection, config: ScanConfig | None = None, **overrides
    ) -> RunContext:
        if config is None:
            merged = {**FAST, **overrides}
            config = make_config("tiny", **merged)
        weights = {stage.name: stage.time_weight(config) for stage in stages_for(config)}
        return RunContext(
            collection=collection,
            config=config,
            runtime=resolve_runtime("cpu", "float32"),
            reporter=Reporter(weights, log_path=tmp_path / "log.jsonl"),
            budget=Budget(config.time_budget_s, weights),
            work_dir=tmp_path,
            generator=torch.Generator().manual_seed(config.seed),
        )

    return build
