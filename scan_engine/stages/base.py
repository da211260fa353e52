"""What every stage shares: the Stage interface, the run's context, the state stages pass on,
what a stage adds to the report, and the time budget split.

A stage names the settings its result depends on; the pipeline chains those into a fingerprint
with the previous stage's, so a checkpoint is reused only when nothing it was computed from
changed. `compute` returns the checkpoint payload; `restore` applies a payload (computed now or
loaded) to the run state, so a resumed run and a fresh one go through the same code.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scan_engine.config import ScanConfig
from scan_engine.data import ImageCollection
from scan_engine.models import ClusteringModel
from scan_engine.results import ClusteringResult
from scan_engine.runtime import Runtime
from scan_engine.sources import ImageSources
from scan_engine.training import Reporter

__all__ = ["Stage", "RunContext", "RunState", "StageReport", "Budget", "clustering_settings"]

# Settings that change how long or how fast stages run or what is shown, not what they hold.
RUN_ONLY_SETTINGS = (
    "preset",
    "time_budget_s",
    "compile",
    "prototype_members",
    "top_members",
    "models_dir",  # where weights are found, not which: the sha256 is in the features stage
    "feature_cache_dir",
)


def clustering_settings(config: ScanConfig, *, with_selflabel: bool) -> dict[str, Any]:
    """What the clustering stages depend on: every setting but the run-only ones."""
    settings = {k: v for k, v in config.to_json_dict().items() if k not in RUN_ONLY_SETTINGS}
    if not with_selflabel:
        settings.pop("selflabel")
    return settings


@dataclass
class RunContext:
    """What a run is given and keeps for its whole length. `config` is replaced once, when the
    select_k stage fixes K."""

    collection: ImageCollection
    config: ScanConfig
    runtime: Runtime
    reporter: Reporter
    budget: Budget
    work_dir: Path
    generator: torch.Generator  # the run's one CPU generator: stages draw from it in order
    # The pretrained route's input, streamed by the features stage, which then sets
    # `collection` to the embedded rows (no pixels).
    sources: ImageSources | None = None

    @property
    def images(self) -> torch.Tensor:
        return self.collection.images  # (N, 3, S, S) uint8

    @property
    def num_images(self) -> int:
        return len(self.collection)


@dataclass
class RunState:
    """What stages hand on to later ones; each field is set by the stage named in its comment."""

    embed: torch.nn.Module | None = None  # pretext: image -> mined feature (prepared)
    # pretext / features: the backbone the clustering model starts from (a feature_dim)
    backbone: torch.nn.Module | None = None
    backbone_reference: dict[str, Any] | None = None  # features: name, weights sha256, ...
    augmented_features: torch.Tensor | None = None  # features: (V, N, D) unit-norm views
    neighbors: torch.Tensor | None = None  # mine: (N, K) int64
    k_selection: dict[str, Any] | None = None  # select_k: {chosen, rule, candidates}
    mined_features: torch.Tensor | None = None  # mine: (N, D), kept when they are head inputs
    head_features: torch.Tensor | None = None  # scan: (N, D) cached heads' input (fixed backbone)
    clustering: ClusteringModel | None = None  # scan (selflabel fine-tunes it)
    scan_state: dict[str, Any] | None = None  # scan: weights after head selection
    scan_chosen_heads: dict[int, int] = field(default_factory=dict)  # scan: C -> kept head
    scan_features: torch.Tensor | None = None  # scan: (N, D) L2-normalised
    scan_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # scan: {C: (1, N, C)}
    final_stage: str = "scan"  # selflabel: "selflabel" once it trained
    selflabel_features: torch.Tensor | None = None  # selflabel, when kept: (N, D) L2-normalised
    selflabel_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # {C: (1, N, C)}
    results: list[ClusteringResult] = field(default_factory=list)  # finalize
    embedding_2d: np.ndarray | None = None  # finalize: (N, 2)
    model_path: Path | None = None  # finalize


@dataclass
class StageReport:
    """What one stage adds to the run's report."""

    images_per_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # merged into PipelineResult.metrics
    notes: list[str] = field(default_factory=list)


class Stage(ABC):
    """One step of the pipeline. Subclasses set `name` and the two time weights."""

    name: str
    # Expected share of a run's time: drives progress, ETA and the time-budget split.
    weight: float
    # The same with the backbone fixed after the pretext (heads on cached features: seconds).
    weight_with_fixed_backbone: float
    # The loop times images/s over the stage's wall time when the stage reports none itself.
    rate_from_wall_time: bool = False

    def __init__(self) -> None:
        # The model compute() built and trained, handed to restore() in the same run: building
        # it again would draw its initialisation from the global RNG a second time and change
        # what later stages draw, so that a fresh run and a resumed one would differ.
        self._built: Any = None

    def take_built(self) -> Any:
        built, self._built = self._built, None
        return built

    def time_weight(self, config: ScanConfig) -> float:
        return self.weight_with_fixed_backbone if config.fixed_backbone else self.weight

    def checkpointed(self, config: ScanConfig) -> bool:
        """Whether the payload is saved in the work folder (cheap stages recompute)."""
        return True

    @abstractmethod
    def settings(self, config: ScanConfig) -> dict[str, Any]:
        """The settings this stage's result depends on (beyond the earlier stages' results)."""

    def result_key(self, payload: dict[str, Any]) -> str | None:
        """What identifies the result beyond the settings (e.g. the weights' sha256); chained
        into the later stages' fingerprints. None: the settings say it all."""
        return None

    def skip_reason(self, ctx: RunContext, state: RunState) -> str | None:
        """Why this stage does not run for this config (a note for the report), or None."""
        return None

    @abstractmethod
    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        """Do the stage's work; returns the checkpoint payload (tensors, plain values)."""

    @abstractmethod
    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        """Apply a payload (just computed or loaded) to `state`."""


class Budget:
    """Splits a time budget over the remaining stages by their weights, as the run goes."""

    def __init__(self, total_s: float | None, weights: dict[str, float]) -> None:
        self.total_s = total_s
        self.weights = weights  # in the run's stage order
        self.started = time.monotonic()

    def for_stage(self, stage: str) -> float | None:
        if self.total_s is None:
            return None
        remaining = self.total_s - (time.monotonic() - self.started)
        names = list(self.weights)
        later = names[names.index(stage) :]
        share = self.weights[stage] / sum(self.weights[s] for s in later)
        # A stage keeps at least half its nominal share even when an earlier one overran, so a
        # slow pretext cannot starve the (cheap) clustering stages down to a few steps.
        floor = 0.5 * self.total_s * self.weights[stage] / sum(self.weights.values())
        return max(remaining * share, floor, 1.0)
