"""`scan-bench`: measure speed and quality on a labelled .npz (e.g. CIFAR-10), one JSON line a run.

    scan-bench --data ../shared/datasets/cifar10_test.npz --preset cpu --budget-s 1800
    scan-bench --stage pretext --repeat 3          # steady-state throughput of one stage
    scan-bench --stage knn                         # faiss kNN time, 50,000 x 512, k = 20
    scan-bench --stage memory --data ...npz        # peak RSS of holding a collection

Full runs print ACC/NMI/ARI for pretext+k-means, SCAN and SCAN+self-labeling, neighbour purity,
per-stage wall time and images/s, peak RSS, the machine and the resolved config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scan_engine import pipeline
from scan_engine.cli.overrides import add_override_option, nest_overrides, parse_overcluster
from scan_engine.config import PRESETS, ScanConfig, make_config
from scan_engine.data import from_arrays, load_npz
from scan_engine.models import ClusteringModel
from scan_engine.neighbors import knn
from scan_engine.pretext import build_contrastive_model, run_pretext
from scan_engine.runtime import resolve_runtime
from scan_engine.scan import run_scan
from scan_engine.selflabel import run_selflabel
from scan_engine.training import Reporter

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def _unit_features(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=generator), dim=1)


def bench_stage(stage: str, config: ScanConfig, steps: int, device: str) -> dict[str, Any]:
    """Steady-state images/s of one training stage (first step excluded), on random images."""
    runtime = resolve_runtime(device, config.precision)
    generator = torch.Generator().manual_seed(config.seed)
    reporter = Reporter({stage: 1.0})
    if stage == "pretext":
        batch = config.pretext.batch_size
        images = _synthetic_images(batch * (steps + 1), config.image_size)
        run_config = config.model_copy(
            update={"pretext": config.pretext.model_copy(update={"epochs": 1})}
        )
        stats = run_pretext(
            build_contrastive_model(run_config), images, run_config, runtime, reporter, generator
        )
        return {
            "images_per_s": stats.images_per_s,
            "steps": stats.steps,
            "batch": batch,
            "views_per_image": 2,
        }
    contrastive = build_contrastive_model(config)
    fixed_backbone = not config.scan.update_backbone
    model = ClusteringModel(
        contrastive.backbone,
        contrastive.backbone.feature_dim,
        config.cluster_counts(),
        config.scan.num_heads,
        head_input_scale=config.scan.feature_scale if fixed_backbone else 1.0,
    )
    # Presets that keep the backbone fixed train heads on cached features: time that path.
    features = augmented = None
    if stage == "scan":
        batch = config.scan.batch_size
        images = _synthetic_images(batch * (steps + 1), config.image_size)
        neighbors = torch.randint(0, images.shape[0], (images.shape[0], 20), generator=generator)
        run_config = config.model_copy(
            update={"scan": config.scan.model_copy(update={"epochs": 1})}
        )
        if fixed_backbone:
            features = _unit_features(images.shape[0], model.feature_dim, generator)
        stats = run_scan(
            model, images, neighbors, run_config, runtime, reporter, generator, features=features
        )
        return {
            "images_per_s": stats.images_per_s,
            "steps": stats.steps,
            "batch": batch,
            "views_per_image": 2,
        }
    if stage == "selflabel":
        batch = config.selflabel.batch_size
        images = _synthetic_images(batch * (steps + 1), config.image_size)
        model.keep_heads({c: 0 for c in config.cluster_counts()})
        run_config = config.model_copy(
            update={
                "selflabel": config.selflabel.model_copy(update={"epochs": 1, "threshold": 0.01})
            }
        )  # every sample confident: full steps
        if fixed_backbone:
            features = _unit_features(images.shape[0], model.feature_dim, generator)
            augmented = torch.stack(
                [_unit_features(images.shape[0], model.feature_dim, generator) for _ in range(2)]
            )
        stats = run_selflabel(
            model,
            images,
            run_config,
            runtime,
            reporter,
            generator,
            features=features,
            augmented_features=augmented,
        )
        return {
            "images_per_s": stats.images_per_s,
            "steps": stats.steps,
            "batch": batch,
            "views_per_image": 2,
        }
    raise ValueError(stage)


def bench_knn(count: int, dim: int, k: int, device: str = "cpu") -> dict[str, Any]:
    """Exact kNN time; on CUDA the features live on the GPU, so `knn` takes the faiss GPU index
    when installed, else the chunked matmul + top-k on the GPU."""
    generator = np.random.default_rng(0)
    features = generator.standard_normal((count, dim), dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    runtime = resolve_runtime(device)
    on_device = torch.from_numpy(features).to(runtime.device) if runtime.is_cuda else features
    started = time.perf_counter()
    knn(on_device, k)
    if runtime.is_cuda:
        torch.cuda.synchronize(runtime.device)
    return {
        "knn_s": time.perf_counter() - started,
        "n": count,
        "dim": dim,
        "k": k,
        "device": str(runtime.device),
    }


def bench_memory(data: Path | None, count: int, size: int) -> dict[str, Any]:
    """Peak RSS after loading a collection: from the .npz when given, else random arrays."""
    before = peak_rss_mb()
    if data is not None:
        collection = load_npz(data, limit=count, image_size=size)
    else:
        arrays = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), np.uint8)
        collection = from_arrays(arrays, image_size=size)
        del arrays
    return {
        "n": len(collection),
        "image_size": size,
        "collection_mb": collection.images.numel() / 2**20,
        "peak_rss_mb_before": before,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_full(
    data: Path, limit: int | None, config: ScanConfig, device: str, work_dir: Path | None = None
) -> dict[str, Any]:
    """One pipeline run; with `work_dir` its checkpoints stay, so that a rerun with other SCAN or
    self-label settings reuses the pretext (and times only what it trains)."""
    collection = load_npz(data, limit=limit, seed=config.seed, image_size=config.image_size)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scan-bench-")))
        started = time.monotonic()
        result = pipeline.run(collection, config, work_dir, device=device)
        wall = time.monotonic() - started
    report = result.report
    return {
        "data": str(data),
        "images": len(collection),
        "wall_s": round(wall, 1),
        "metrics": report["metrics"],
        "neighbor_purity": result.metrics.get("neighbor_purity"),
        "timings_s": report["timings_s"],
        "images_per_s": report["images_per_s"],
        "notes": result.notes,
        "stages": {k: v for k, v in result.metrics.items() if k in ("pretext", "selflabel")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scan-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=None, help=".npz with images and labels")
    parser.add_argument(
        "--stage", default="all", choices=["all", "pretext", "scan", "selflabel", "knn", "memory"]
    )
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--overcluster", default=None)
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of N")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget of a full run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps for --stage runs")
    parser.add_argument("--repeat", type=int, default=1, help="repeat and report the median")
    parser.add_argument("--knn-n", type=int, default=50_000)
    parser.add_argument("--knn-dim", type=int, default=512)
    parser.add_argument("--memory-n", type=int, default=50_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep a full run's checkpoints here (resume)"
    )
    add_override_option(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    overrides = nest_overrides(args.overrides)
    overrides.update(num_clusters=args.clusters, overcluster=parse_overcluster(args.overcluster))
    if args.budget_s is not None:
        overrides["time_budget_s"] = args.budget_s
    config = make_config(args.preset, **overrides)
    runtime = resolve_runtime(args.device, config.precision)
    base = {"stage": args.stage, "machine": pipeline.machine_info(runtime)}
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        if args.stage == "all":
            if args.data is None:
                parser.error("--data is needed for a full run")
            runs.append(run_full(args.data, args.limit, config, args.device, args.work_dir))
        elif args.stage == "knn":
            runs.append(bench_knn(args.knn_n, args.knn_dim, 20, args.device))
        elif args.stage == "memory":
            runs.append(bench_memory(args.data, args.memory_n, config.image_size))
        else:
            runs.append(bench_stage(args.stage, config, args.steps, args.device))
    line: dict[str, Any] = {**base, "runs": runs}
    for key in ("images_per_s", "knn_s", "wall_s"):
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            line[f"median_{key}"] = round(statistics.median(values), 3)
    line["peak_rss_mb"] = round(peak_rss_mb(), 1)
    line["config"] = config.to_json_dict()
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
