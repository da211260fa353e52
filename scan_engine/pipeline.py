"""The whole SCAN pipeline for one collection: a short loop over stage objects
(scan_engine.stages): pretext -> mine -> (select_k) -> scan -> selflabel -> finalize.

The loop owns what every stage shares: checkpoints (each stage's payload in the work folder,
valid while the collection and every setting it or an earlier stage depends on are unchanged:
fingerprints chain), timing, the time-budget split, progress and the report. A rerun with the
same folder resumes after the last finished stage. A progress callback gets stage, fraction and
ETA; a stop flag is checked between steps (StopRequested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scan_engine.config import ConfigError, ScanConfig
from scan_engine.data import ImageCollection
from scan_engine.feature_cache import content_key
from scan_engine.predict import MODEL_FILE
from scan_engine.results import ClusteringResult, PipelineResult, ProgressEvent
from scan_engine.runtime import Runtime, cpu_fields, cpu_has_native_bf16, resolve_runtime
from scan_engine.sources import ImageSources
from scan_engine.stages import STAGE_NAMES
from scan_engine.stages.base import Budget, RunContext, RunState, Stage
from scan_engine.stages.features import FeaturesStage, as_sources, listing_as_collection
from scan_engine.stages.finalize import FinalizeStage
from scan_engine.stages.mine import MineStage
from scan_engine.stages.pretext import PretextStage
from scan_engine.stages.scan import ScanStage
from scan_engine.stages.select_k import SelectKStage
from scan_engine.stages.selflabel import SelfLabelStage
from scan_engine.training import Reporter

logger = logging.getLogger(__name__)

__all__ = ["run", "stages_for", "STAGE_NAMES", "MODEL_FILE", "machine_info"]


def stages_for(config: ScanConfig) -> list[Stage]:
    """The stages a run of `config` goes through, in order."""
    first = FeaturesStage() if config.pretrained_backbone is not None else PretextStage()
    stages: list[Stage] = [first, MineStage()]
    if config.num_clusters_range is not None:
        stages.append(SelectKStage())
    stages += [ScanStage(), SelfLabelStage(), FinalizeStage()]
    return stages


class Checkpoints:
    """Stage payloads in the work folder, each stamped with its fingerprint."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir

    def path(self, stage: str) -> Path:
        return self.work_dir / f"{stage}.pt"

    def load(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        path = self.path(stage)
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a torn or foreign file: recompute the stage
            logger.warning("ignoring unreadable checkpoint %s: %s", path, error)
            return None
        if saved.get("fingerprint") != fingerprint:
            logger.warning("ignoring checkpoint %s from another config or collection", path)
            return None
        logger.info("resuming: stage %s loaded from %s", stage, path)
        return saved["payload"]

    def save(
        self, stage: str, fingerprint: str, payload: dict[str, Any], config: ScanConfig
    ) -> None:
        # Write then rename, so that a crash never leaves a half-written checkpoint behind.
        path = self.path(stage)
        temporary = path.with_suffix(".tmp")
        record = {"fingerprint": fingerprint, "config": config.to_json_dict(), "payload": payload}
        torch.save(record, temporary)
        os.replace(temporary, path)


def chain_fingerprint(previous: str, settings: dict[str, Any]) -> str:
    """A stage's fingerprint: its own settings and the previous stage's fingerprint."""
    text = f"{json.dumps(settings, sort_keys=True)}\n{previous}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def collection_key(collection: ImageCollection) -> str:
    """Which images, in which order, at which size: the first link of the fingerprint chain."""
    digest = hashlib.sha256(str(tuple(collection.images.shape)).encode())
    digest.update("\n".join(collection.ids).encode())
    return digest.hexdigest()


def _check_inputs(collection: ImageCollection | ImageSources, config: ScanConfig) -> None:
    if isinstance(collection, ImageSources) and config.pretrained_backbone is None:
        raise ConfigError(
            "streamed image sources need a pretrained backbone (preset pretrained); "
            "the scratch route trains on decoded images (an ImageCollection)"
        )
    if len(collection) < 2:
        raise ConfigError(f"the collection has {len(collection)} usable images; at least 2 needed")
    too_many = [c for c in config.possible_cluster_counts() if c > len(collection)]
    if too_many:
        raise ConfigError(f"cannot make {too_many} clusters from {len(collection)} images")
    if config.pretrained_backbone is not None:
        return  # the features stage resizes every image to config.image_size
    assert isinstance(collection, ImageCollection)
    size = collection.images.shape[-1]
    if size != config.image_size:
        raise ConfigError(f"images are {size} px but the config asks for {config.image_size} px")


def run(
    collection: ImageCollection | ImageSources,
    config: ScanConfig,
    work_dir: str | Path,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
) -> PipelineResult:
    """Cluster `collection` into every count of `config.cluster_counts()`.

    With config.pretrained_backbone, `collection` may be ImageSources (streamed: the pixels are
    never all in memory); an ImageCollection is read row by row the same way.

    Returns one ClusteringResult per cluster count, plus timings, throughput and (labels known)
    metrics per stage. Raises ConfigError for impossible requests and StopRequested when
    `should_stop()` turns true.
    """
    _check_inputs(collection, config)
    ctx, first_key = _context(collection, config, Path(work_dir), progress, should_stop, device)
    stages, state, checkpoints = stages_for(config), RunState(), Checkpoints(ctx.work_dir)
    record = _RunRecord()
    logger.info(
        "SCAN run on %d images, C=%s, runtime %s, config %s",
        ctx.num_images,
        config.cluster_counts(),
        ctx.runtime.describe(),
        json.dumps(config.to_json_dict()),
    )
    ctx.reporter.update(stages[0].name, 0.0, "starting", force=True)
    run_started = time.monotonic()
    fingerprint = first_key
    for stage in stages:
        started = time.monotonic()
        fingerprint = chain_fingerprint(fingerprint, stage.settings(ctx.config))
        fingerprint = _run_stage(stage, ctx, state, checkpoints, fingerprint, record)
        record.timings[stage.name] = time.monotonic() - started
        if stage.rate_from_wall_time:
            record.throughput[stage.name] = ctx.num_images / max(record.timings[stage.name], 1e-9)
    record.timings["total"] = time.monotonic() - run_started
    ctx.reporter.update(stages[-1].name, 1.0, "done", force=True)

    report = _report(ctx, state.results, record)
    (ctx.work_dir / "report.json").write_text(json.dumps(report, indent=2))
    return PipelineResult(
        state.results,
        record.timings,
        record.throughput,
        record.metrics,
        record.notes,
        report,
        str(state.model_path),
        state.embedding_2d,
        k_selection=record.metrics.get("k_selection"),
        rows=ctx.collection,
    )


@dataclass
class _RunRecord:
    """What the loop gathers for the report, stage by stage."""

    timings: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    throughput: dict[str, float] = field(default_factory=dict)  # stage -> images/s
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _context(
    collection: ImageCollection | ImageSources,
    config: ScanConfig,
    work_dir: Path,
    progress: Callable[[ProgressEvent], None] | None,
    should_stop: Callable[[], bool] | None,
    device: str | torch.device | None,
) -> tuple[RunContext, str]:
    """The run's context, seeded, and the first link of its fingerprint chain."""
    work_dir.mkdir(parents=True, exist_ok=True)
    runtime = resolve_runtime(device, config.precision)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    weights = {stage.name: stage.time_weight(config) for stage in stages_for(config)}
    reporter = Reporter(weights, progress, should_stop, log_path=work_dir / "log.jsonl")
    budget = Budget(config.time_budget_s, weights)
    generator = torch.Generator().manual_seed(config.seed)
    sources = None
    if config.pretrained_backbone is not None:
        sources = as_sources(collection)
        collection, first_key = listing_as_collection(sources), content_key(sources)
    else:
        assert isinstance(collection, ImageCollection)
        first_key = collection_key(collection)
    ctx = RunContext(collection, config, runtime, reporter, budget, work_dir, generator, sources)
    return ctx, first_key


def _run_stage(
    stage: Stage,
    ctx: RunContext,
    state: RunState,
    checkpoints: Checkpoints,
    fingerprint: str,
    record: _RunRecord,
) -> str:
    """Restore `stage` from its checkpoint or compute (and save) it; returns the fingerprint
    the next stage chains on."""
    skipped = stage.skip_reason(ctx, state)
    if skipped is not None:
        record.notes.append(skipped)
        return fingerprint
    checkpointed = stage.checkpointed(ctx.config)
    payload = checkpoints.load(stage.name, fingerprint) if checkpointed else None
    if payload is None:
        payload = stage.compute(ctx, state)
        if checkpointed:
            checkpoints.save(stage.name, fingerprint, payload, ctx.config)
    report = stage.restore(ctx, state, payload)
    record.metrics.update(report.metrics)
    record.notes.extend(report.notes)
    if report.images_per_s is not None:
        record.throughput[stage.name] = report.images_per_s
    if (result_key := stage.result_key(payload)) is not None:
        fingerprint = chain_fingerprint(fingerprint, {"result": result_key})
    return fingerprint


def machine_info(runtime: Runtime) -> dict[str, Any]:
    fields = cpu_fields()
    info: dict[str, Any] = {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        # Same model name, different cores: "AMD EPYC" has been a Zen 3 and a Zen 4 here.
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "native_bf16": cpu_has_native_bf16(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **runtime.describe(),
    }
    if runtime.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


def _summary(evaluation: dict[str, Any] | None) -> dict[str, float] | None:
    if evaluation is None:
        return None
    return {key: round(float(evaluation[key]), 4) for key in ("acc", "nmi", "ari")}


def _report(ctx: RunContext, results: list[ClusteringResult], record: _RunRecord) -> dict[str, Any]:
    collection, config, stage_metrics = ctx.collection, ctx.config, record.metrics
    summary: dict[str, Any] = {}
    if collection.labels is not None:
        main = next(r for r in results if r.num_clusters == config.num_clusters)
        assert main.metrics is not None
        summary = {
            "kmeans": _summary(stage_metrics.get("kmeans")),
            "scan": _summary(main.metrics.get("scan")),
            "selflabel": _summary(main.metrics.get("selflabel")),
        }
    features = stage_metrics.get("features")
    return {
        "route": "pretrained" if features else "scratch",
        "backbone": features
        and {
            key: features[key]
            for key in (
                "name",
                "weights_sha256",
                "weights_source",
                "image_size",
                "from_cache",
                "images_per_s",
            )
        },
        "config": config.to_json_dict(),
        "machine": machine_info(ctx.runtime),
        "images": len(collection),
        "skipped_count": len(collection.skipped),
        "skipped": [{"path": s.path, "reason": s.reason} for s in collection.skipped],
        "cluster_counts": [r.num_clusters for r in results],
        "timings_s": {k: round(v, 3) for k, v in record.timings.items()},
        "images_per_s": {k: round(v, 2) for k, v in record.throughput.items()},
        "metrics": summary or None,
        "stages": stage_metrics,
        "results": [
            {
                "num_clusters": r.num_clusters,
                "head": r.head,
                "stage": r.stage,
                "sizes": [c.size for c in r.clusters],
                "metrics": r.metrics,
            }
            for r in results
        ],
        "notes": record.notes,
        "k_selection": stage_metrics.get("k_selection"),
    }
