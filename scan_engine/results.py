"""What a pipeline run hands back: per-cluster-count results, timings, metrics, progress events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ProgressEvent", "ClusterSummary", "ClusteringResult", "PipelineResult", "StopRequested"]


class StopRequested(Exception):
    """Raised inside the pipeline when the caller's stop flag turns true (job cancelled)."""


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. `fraction` is of the whole run (0..1); `eta_s` None when unknown."""

    stage: str
    stage_fraction: float
    fraction: float
    eta_s: float | None
    message: str = ""


@dataclass
class ClusterSummary:
    """One cluster: indices are positions in the collection (collection.ids[i] is the image id)."""

    index: int
    size: int
    mean_confidence: float
    prototype: int | None  # None for an empty cluster
    top_members: list[int] = field(default_factory=list)  # most confident first

    def to_json(self, ids: list[str] | None = None) -> dict[str, Any]:
        def name(i: int | None) -> Any:
            return None if i is None else (ids[i] if ids is not None else i)

        return {
            "index": self.index,
            "size": self.size,
            "mean_confidence": self.mean_confidence,
            "prototype": name(self.prototype),
            "top_members": [name(i) for i in self.top_members],
        }


@dataclass
class ClusteringResult:
    """The clustering for one cluster count C (K itself, or an overclustering)."""

    num_clusters: int
    assignments: np.ndarray  # (N,) int64 cluster index per image
    confidence: np.ndarray  # (N,) float32 max softmax probability
    clusters: list[ClusterSummary]
    head: int  # which SCAN head was kept
    stage: str  # "selflabel" or "scan": the stage whose model produced the assignments
    metrics: dict[str, Any] | None = None  # per stage, when labels are known


@dataclass
class PipelineResult:
    results: list[ClusteringResult]
    timings: dict[str, float]  # stage -> wall seconds
    throughput: dict[str, float]  # stage -> images per second
    metrics: dict[str, Any]  # run-level: k-means baseline, neighbour purity (labels known)
    notes: list[str]  # things a person should know (e.g. why self-labeling was skipped)
    report: dict[str, Any]  # everything above plus config, as written to report.json
    model_path: str | None = None  # checkpoint that prediction needs
    embedding_2d: np.ndarray | None = None  # (N, 2) float32 map of the final features (PCA)
    # K chosen without labels (config.num_clusters_range): {chosen, rule, candidates: [scores]}.
    k_selection: dict[str, Any] | None = None
    # The collection the results index (ImageCollection): on the pretrained route the rows
    # that were embedded (without pixels), in a run from ImageSources the only list of them.
    rows: Any = None

    def result_for(self, num_clusters: int) -> ClusteringResult:
        for result in self.results:
            if result.num_clusters == num_clusters:
                return result
        raise KeyError(num_clusters)
