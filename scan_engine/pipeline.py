"""The whole SCAN pipeline for one collection: pretext -> mine -> scan -> selflabel -> finalize.

Each stage writes a checkpoint into the work folder when it finishes; a rerun with the same
folder, config and collection resumes after the last finished stage. A progress callback gets
stage, fraction and ETA; a stop flag is checked between steps (StopRequested).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scan_engine import metrics
from scan_engine.augment import StrongAugment
from scan_engine.config import ConfigError, ScanConfig
from scan_engine.data import ImageCollection
from scan_engine.model_selection import KSelection, run_k_selection
from scan_engine.models import ClusteringModel, ResNet, build_backbone, load_backbone_weights
from scan_engine.neighbors import extract_features, knn, purity_at
from scan_engine.predict import prediction_state
from scan_engine.pretext import build_contrastive_model, run_pretext
from scan_engine.prototypes import cluster_summaries
from scan_engine.results import ClusteringResult, PipelineResult, ProgressEvent
from scan_engine.runtime import Runtime, cpu_fields, cpu_has_native_bf16, resolve_runtime
from scan_engine.scan import infer, run_scan
from scan_engine.selflabel import run_selflabel
from scan_engine.training import Reporter, device_generator

logger = logging.getLogger(__name__)

__all__ = ["run", "STAGES", "MODEL_FILE"]

# Expected share of a run's time per stage: drives progress, ETA and the time-budget split.
STAGE_WEIGHTS = {"pretext": 0.62, "mine": 0.03, "scan": 0.22, "selflabel": 0.11, "finalize": 0.02}
# With the backbone fixed after the pretext, SCAN and self-labeling train heads on cached
# features (seconds), so nearly the whole budget goes to the pretext.
HEADS_ONLY_STAGE_WEIGHTS = {
    "pretext": 0.9,
    "mine": 0.03,
    "scan": 0.03,
    "selflabel": 0.03,
    "finalize": 0.01,
}
STAGES = tuple(STAGE_WEIGHTS)
MODEL_FILE = "model.pt"
# Strongly augmented feature views cached for self-labeling on the frozen (pretrained) route.
FROZEN_AUGMENTED_VIEWS = 2


class _Checkpoints:
    """Stage checkpoints in the work folder, each valid only for the same collection and the
    settings that stage depends on: a rerun with other SCAN settings keeps the pretext."""

    def __init__(self, work_dir: Path, config: ScanConfig, collection: ImageCollection) -> None:
        self.work_dir = work_dir
        self.config = config
        self.collection_key = _collection_key(collection)

    def path(self, stage: str) -> Path:
        return self.work_dir / f"{stage}.pt"

    def fingerprint(self, stage: str) -> str:
        settings = json.dumps(_stage_settings(stage, self.config), sort_keys=True)
        return hashlib.sha256(f"{settings}\n{self.collection_key}".encode()).hexdigest()[:16]

    def load(self, stage: str) -> dict[str, Any] | None:
        path = self.path(stage)
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a torn or foreign file: recompute the stage
            logger.warning("ignoring unreadable checkpoint %s: %s", path, error)
            return None
        if saved.get("fingerprint") != self.fingerprint(stage):
            logger.warning("ignoring checkpoint %s from another config or collection", path)
            return None
        logger.info("resuming: stage %s loaded from %s", stage, path)
        return saved["payload"]

    def save(self, stage: str, payload: dict[str, Any], config: ScanConfig) -> None:
        # Write then rename, so that a crash never leaves a half-written checkpoint behind.
        path = self.path(stage)
        temporary = path.with_suffix(".tmp")
        torch.save(
            {
                "fingerprint": self.fingerprint(stage),
                "config": config.to_json_dict(),
                "payload": payload,
            },
            temporary,
        )
        os.replace(temporary, path)


# What the pretext's result depends on; the later stages depend on everything but the settings
# below, which change how long or how fast stages run or what is shown, not what they hold.
_PRETEXT_SETTINGS = (
    "image_size",
    "backbone",
    "backbone_width",
    "backbone_weights",
    "pretext",
    "precision",
    "seed",
)
_RUN_ONLY_SETTINGS = ("preset", "time_budget_s", "compile", "prototype_members", "top_members")


def _stage_settings(stage: str, config: ScanConfig) -> dict[str, Any]:
    settings = config.to_json_dict()
    if stage == "pretext":
        return {key: settings[key] for key in _PRETEXT_SETTINGS}
    if stage == "mine":
        pretext = {key: settings[key] for key in _PRETEXT_SETTINGS}
        # The k-means baseline kept with the mined neighbours is computed for num_clusters.
        return {
            **pretext,
            "num_neighbors": settings["scan"]["num_neighbors"],
            "num_clusters": settings["num_clusters"],
        }
    later = {k: v for k, v in settings.items() if k not in _RUN_ONLY_SETTINGS}
    if stage != "selflabel":
        later.pop("selflabel")
    return later


def _collection_key(collection: ImageCollection) -> str:
    """Which images, in which order, at which size: hashed once per run."""
    digest = hashlib.sha256(str(tuple(collection.images.shape)).encode())
    digest.update("\n".join(collection.ids).encode())
    return digest.hexdigest()


class _Budget:
    """Splits a time budget over the remaining stages by their weights, as the run goes."""

    def __init__(self, total_s: float | None, weights: dict[str, float]) -> None:
        self.total_s = total_s
        self.weights = weights
        self.started = time.monotonic()

    def for_stage(self, stage: str) -> float | None:
        if self.total_s is None:
            return None
        remaining = self.total_s - (time.monotonic() - self.started)
        later = STAGES[STAGES.index(stage) :]
        share = self.weights[stage] / sum(self.weights[s] for s in later)
        # A stage keeps at least half its nominal share even when an earlier one overran, so a
        # slow pretext cannot starve the (cheap) clustering stages down to a few steps.
        floor = 0.5 * self.total_s * self.weights[stage] / sum(self.weights.values())
        return max(remaining * share, floor, 1.0)


def _check_inputs(collection: ImageCollection, config: ScanConfig) -> None:
    if len(collection) < 2:
        raise ConfigError(f"the collection has {len(collection)} usable images; at least 2 needed")
    too_many = [c for c in config.possible_cluster_counts() if c > len(collection)]
    if too_many:
        raise ConfigError(f"cannot make {too_many} clusters from {len(collection)} images")
    size = collection.images.shape[-1]
    if size != config.image_size:
        raise ConfigError(f"images are {size} px but the config asks for {config.image_size} px")


def _evaluate(
    collection: ImageCollection, predictions: np.ndarray, num_clusters: int
) -> dict[str, Any] | None:
    if collection.labels is None:
        return None
    num_classes = len(collection.class_names) if collection.class_names else None
    return metrics.evaluate(
        collection.labels, predictions, num_classes=num_classes, num_clusters=num_clusters
    )


def _kmeans_baseline(
    features: torch.Tensor, collection: ImageCollection, num_clusters: int, seed: int
) -> dict[str, Any] | None:
    """Pretext features + k-means: the paper's baseline, only computed when labels are known."""
    if collection.labels is None:
        return None
    from sklearn.cluster import KMeans

    predictions = KMeans(num_clusters, n_init=3, random_state=seed).fit_predict(features.numpy())
    return _evaluate(collection, predictions, num_clusters)


def _summary(evaluation: dict[str, Any] | None) -> dict[str, float] | None:
    if evaluation is None:
        return None
    return {key: round(float(evaluation[key]), 4) for key in ("acc", "nmi", "ari")}


def run(
    collection: ImageCollection,
    config: ScanConfig,
    work_dir: str | Path,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
) -> PipelineResult:
    """Cluster `collection` into every count of `config.cluster_counts()`.

    Returns one ClusteringResult per cluster count, plus timings, throughput and (labels known)
    metrics per stage. Raises ConfigError for impossible requests and StopRequested when
    `should_stop()` turns true.
    """
    _check_inputs(collection, config)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    runtime = resolve_runtime(device, config.precision)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    generator = torch.Generator().manual_seed(config.seed)
    heads_only = config.backbone_weights is not None or not config.scan.update_backbone
    weights = HEADS_ONLY_STAGE_WEIGHTS if heads_only else STAGE_WEIGHTS
    reporter = Reporter(weights, progress, should_stop, log_path=work_dir / "log.jsonl")
    checkpoints = _Checkpoints(work_dir, config, collection)
    budget = _Budget(config.time_budget_s, weights)
    images = collection.images
    num_images = len(collection)
    counts = config.cluster_counts()
    timings: dict[str, float] = {}
    throughput: dict[str, float] = {}
    stage_metrics: dict[str, Any] = {}
    notes: list[str] = []
    run_started = time.monotonic()
    logger.info(
        "SCAN run on %d images, C=%s, runtime %s, config %s",
        num_images,
        counts,
        runtime.describe(),
        json.dumps(config.to_json_dict()),
    )
    reporter.update("pretext", 0.0, "starting", force=True)

    # 1. Pretext: SimCLR, or a pretrained backbone loaded from a local file.
    frozen = config.backbone_weights is not None
    started = time.monotonic()
    backbone: ResNet
    if frozen:
        backbone = build_backbone(config.backbone, config.backbone_width, config.image_size)
        load_backbone_weights(backbone, config.backbone_weights or "")
        embed: torch.nn.Module = runtime.prepare(backbone)
        notes.append("pretrained backbone: pretext skipped, backbone frozen")
    else:
        contrastive = build_contrastive_model(config)
        saved = checkpoints.load("pretext")
        if saved is None:
            stats = run_pretext(
                contrastive,
                images,
                config,
                runtime,
                reporter,
                generator,
                budget.for_stage("pretext"),
            )
            saved = {"model": contrastive.state_dict(), "stats": vars(stats)}
            checkpoints.save("pretext", saved, config)
            throughput["pretext"] = stats.images_per_s
        else:
            contrastive.load_state_dict(saved["model"])
            throughput["pretext"] = saved["stats"]["images_per_s"]
        stage_metrics["pretext"] = {k: saved["stats"][k] for k in ("steps", "epochs", "final_loss")}
        embed = runtime.prepare(contrastive)
        backbone = contrastive.backbone
    timings["pretext"] = time.monotonic() - started

    # 2. Mine neighbours on L2-normalised pretext features (SimCLR: the 128-d projection).
    started = time.monotonic()
    saved = checkpoints.load("mine")
    if saved is None:
        reporter.update("mine", 0.0, "embedding", force=True)
        features = extract_features(
            embed,
            images,
            config.eval_batch_size,
            runtime.device,
            runtime.amp_dtype,
            progress=lambda done, total: reporter.update("mine", 0.6 * done / total, "embedding"),
        )
        k = min(config.scan.num_neighbors, num_images - 1)
        neighbors, _ = knn(features, k)
        reporter.update("mine", 0.8, "k-means baseline", force=True)
        purity = purity_at(neighbors, collection.labels, ks=sorted({1, 5, k}))
        saved = {
            "neighbors": torch.from_numpy(neighbors),
            "features": features if frozen else None,
            "purity": {str(key): value for key, value in (purity or {}).items()} or None,
            "kmeans": _kmeans_baseline(features, collection, config.num_clusters, config.seed),
        }
        checkpoints.save("mine", saved, config)
    neighbors_t: torch.Tensor = saved["neighbors"]
    cached_features: torch.Tensor | None = saved["features"]
    stage_metrics["neighbor_purity"] = saved["purity"]
    stage_metrics["kmeans"] = saved["kmeans"]
    timings["mine"] = time.monotonic() - started
    throughput["mine"] = num_images / max(timings["mine"], 1e-9)
    reporter.update("mine", 1.0, "neighbours mined", force=True)

    # 2b. K unknown: score candidate heads on the mined features and fix K before the SCAN step.
    k_selection: KSelection | None = None
    if config.num_clusters_range is not None:
        started = time.monotonic()
        saved = checkpoints.load("select_k")
        if saved is None:
            k_selection, mined_features = run_k_selection(
                embed, images, neighbors_t, config, runtime, reporter, cached_features
            )
            # The k-means baseline of the mine stage used a placeholder K: redo it for the choice.
            kmeans = _kmeans_baseline(mined_features, collection, k_selection.chosen, config.seed)
            saved = {"k_selection": k_selection.to_json(), "kmeans": kmeans}
            checkpoints.save("select_k", saved, config)
        k_selection = KSelection.from_json(saved["k_selection"])
        config = config.model_copy(update={"num_clusters": k_selection.chosen})
        counts = config.cluster_counts()
        stage_metrics["k_selection"] = k_selection.to_json()
        stage_metrics["kmeans"] = saved.get("kmeans", stage_metrics["kmeans"])
        timings["select_k"] = time.monotonic() - started

    # 3. SCAN step: one backbone, `num_heads` heads for every cluster count.
    started = time.monotonic()
    head_features = cached_features if heads_only else None
    clustering = ClusteringModel(
        copy.deepcopy(backbone),
        backbone.feature_dim,
        counts,
        config.scan.num_heads,
        head_input_scale=config.scan.feature_scale if heads_only else 1.0,
    )
    clustering.backbone.requires_grad_(config.scan.update_backbone and not frozen)
    if head_features is None and not config.scan.update_backbone:
        head_features = extract_features(
            clustering.backbone, images, config.eval_batch_size, runtime.device, runtime.amp_dtype
        )
    saved = checkpoints.load("scan")
    if saved is None:
        scan_stats = run_scan(
            clustering,
            images,
            neighbors_t,
            config,
            runtime,
            reporter,
            generator,
            budget.for_stage("scan"),
            features=head_features,
        )
        saved = {"model": clustering.state_dict(), "stats": vars(scan_stats)}
        checkpoints.save("scan", saved, config)
        throughput["scan"] = scan_stats.images_per_s
    else:
        clustering.keep_heads(saved["stats"]["chosen_heads"])
        clustering.load_state_dict(saved["model"])
        throughput["scan"] = saved["stats"]["images_per_s"]
    scan_state = copy.deepcopy(clustering.state_dict())
    stage_metrics["scan"] = {
        "steps": saved["stats"]["steps"],
        "epochs": saved["stats"]["epochs"],
        "chosen_heads": saved["stats"]["chosen_heads"],
        "head_losses": saved["stats"]["head_losses"],
    }
    clustering = runtime.prepare(clustering)
    scan_features, scan_logits = infer(
        clustering, images, runtime, config.eval_batch_size, features=head_features
    )
    scan_predictions = {c: scan_logits[c][0].argmax(1).numpy() for c in counts}
    timings["scan"] = time.monotonic() - started

    # 4. Self-labeling.
    started = time.monotonic()
    final_stage = "scan"
    if config.selflabel.enabled and config.selflabel.epochs > 0:
        saved = checkpoints.load("selflabel")
        if saved is None:
            augmented = None
            if head_features is not None:
                augmented = _augmented_features(
                    clustering.backbone, images, config, runtime, generator
                )
            sl_stats = run_selflabel(
                clustering,
                images,
                config,
                runtime,
                reporter,
                generator,
                budget.for_stage("selflabel"),
                features=head_features,
                augmented_features=augmented,
            )
            saved = {
                "model": clustering.state_dict(),
                "stats": vars(sl_stats),
                "trained": sl_stats.trained,
            }
            checkpoints.save("selflabel", saved, config)
            throughput["selflabel"] = sl_stats.images_per_s
        else:
            throughput["selflabel"] = saved["stats"]["images_per_s"]
        stage_metrics["selflabel"] = {
            "steps": saved["stats"]["steps"],
            "epochs": saved["stats"]["epochs"],
            "confident_per_epoch": saved["stats"]["confident_per_epoch"],
            "skipped_batches": saved["stats"]["skipped_batches"],
        }
        if saved["trained"]:
            clustering.load_state_dict(saved["model"])
            final_stage = "selflabel"
        else:
            clustering.load_state_dict(scan_state)
            notes.append(
                f"self-labeling found no prediction above the "
                f"{config.selflabel.threshold} confidence threshold; the SCAN result "
                "is kept"
            )
    else:
        notes.append("self-labeling disabled by the config")
    timings["selflabel"] = time.monotonic() - started

    # 5. Finalize: assignments, confidence, prototypes, metrics; the model kept for prediction.
    started = time.monotonic()
    reporter.update("finalize", 0.0, "assigning", force=True)
    if final_stage == "selflabel":
        final_features, final_logits = infer(
            clustering, images, runtime, config.eval_batch_size, features=head_features
        )
    else:
        final_features, final_logits = scan_features, scan_logits
    results = []
    for c in counts:
        probabilities = F.softmax(final_logits[c][0], dim=1)  # (N, C)
        confidence, assignments = probabilities.max(1)
        assignments_np = assignments.numpy().astype(np.int64)
        confidence_np = confidence.numpy().astype(np.float32)
        clusters = cluster_summaries(
            final_features,
            assignments_np,
            confidence_np,
            c,
            config.prototype_members,
            config.top_members,
        )
        evaluation = None
        if collection.labels is not None:
            evaluation = {"scan": _evaluate(collection, scan_predictions[c], c)}
            if final_stage == "selflabel":
                evaluation["selflabel"] = _evaluate(collection, assignments_np, c)
        results.append(
            ClusteringResult(
                c,
                assignments_np,
                confidence_np,
                clusters,
                int(stage_metrics["scan"]["chosen_heads"][c]),
                final_stage,
                evaluation,
            )
        )
    embedding_2d = _project_2d(final_features)
    model_path = work_dir / MODEL_FILE
    _save_model(
        clustering,
        config,
        model_path,
        frozen,
        prediction_state(
            final_features,
            final_logits,
            neighbors_t,
            heads_on_normalized_features=head_features is not None,
            head_input_scale=clustering.head_input_scale,
            num_clusters=config.num_clusters,
            k_selection=stage_metrics.get("k_selection"),
        ),
    )
    timings["finalize"] = time.monotonic() - started
    timings["total"] = time.monotonic() - run_started
    reporter.update("finalize", 1.0, "done", force=True)

    report = _report(
        collection, config, runtime, results, timings, throughput, stage_metrics, notes
    )
    (work_dir / "report.json").write_text(json.dumps(report, indent=2))
    return PipelineResult(
        results,
        timings,
        throughput,
        stage_metrics,
        notes,
        report,
        str(model_path),
        embedding_2d,
        k_selection=stage_metrics.get("k_selection"),
    )


def _augmented_features(
    backbone: torch.nn.Module,
    images: torch.Tensor,
    config: ScanConfig,
    runtime: Runtime,
    generator: torch.Generator,
) -> torch.Tensor:
    """(V, N, D) features of V strongly augmented views, computed once for the frozen route."""
    augment = StrongAugment(config.image_size)
    on_device = device_generator(runtime.device, generator)
    views = []
    backbone.eval()
    with torch.inference_mode():
        for _ in range(FROZEN_AUGMENTED_VIEWS):
            parts = []
            for start in range(0, images.shape[0], config.eval_batch_size):
                batch = runtime.images(images[start : start + config.eval_batch_size])
                with runtime.autocast():
                    parts.append(
                        F.normalize(
                            backbone(augment(batch, generator=on_device)).float(), dim=1
                        ).cpu()
                    )
            views.append(torch.cat(parts))
    with torch.inference_mode(False):
        return torch.stack(views).clone()


def _project_2d(features: torch.Tensor) -> np.ndarray:
    """(N, D) -> (N, 2) by PCA: a cheap, deterministic map of the collection for the gallery."""
    centred = features.float() - features.float().mean(0, keepdim=True)
    if centred.shape[0] < 2:
        return np.zeros((centred.shape[0], 2), dtype=np.float32)
    _, _, components = torch.pca_lowrank(centred, q=min(2, *centred.shape), center=False)
    projected = centred @ components[:, :2]
    if projected.shape[1] < 2:
        projected = F.pad(projected, (0, 2 - projected.shape[1]))
    return projected.numpy().astype(np.float32)


def _save_model(
    model: ClusteringModel,
    config: ScanConfig,
    path: Path,
    frozen: bool,
    prediction: dict[str, Any] | None = None,
) -> None:
    """What prediction needs: weights, the config (preprocessing, image size) and a version;
    `prediction` (predict.prediction_state) adds cluster geometry and sets the format version."""
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            "format_version": 1,
            "config": config.to_json_dict(),
            "frozen_backbone": frozen,
            "cluster_counts": model.cluster_counts,
            "state_dict": model.state_dict(),
            **(prediction or {}),
        },
        temporary,
    )
    os.replace(temporary, path)


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


def _report(
    collection: ImageCollection,
    config: ScanConfig,
    runtime: Runtime,
    results: list[ClusteringResult],
    timings: dict[str, float],
    throughput: dict[str, float],
    stage_metrics: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if collection.labels is not None:
        main = next(r for r in results if r.num_clusters == config.num_clusters)
        assert main.metrics is not None
        summary = {
            "kmeans": _summary(stage_metrics.get("kmeans")),
            "scan": _summary(main.metrics.get("scan")),
            "selflabel": _summary(main.metrics.get("selflabel")),
        }
    return {
        "config": config.to_json_dict(),
        "machine": machine_info(runtime),
        "images": len(collection),
        "skipped": len(collection.skipped),
        "cluster_counts": [r.num_clusters for r in results],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "images_per_s": {k: round(v, 2) for k, v in throughput.items()},
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
        "notes": notes,
        "k_selection": stage_metrics.get("k_selection"),
    }
