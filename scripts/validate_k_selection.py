"""How often does label-free K selection land on the true number of classes, and how near?

Runs the pipeline with `num_clusters_range` on labelled collections (labels are never shown to
the selection; they only grade it) and stops once K is chosen, unless --full:

    # generated shapes: 3, 4 and 6 classes x seeds 0 and 1, candidates 2..2·classes
    python scripts/validate_k_selection.py --classes 3 4 6 --seeds 0 1 --out k_validation.json
    # CIFAR-10 subsets (benchmark data, not part of the tests)
    python scripts/validate_k_selection.py --npz ../shared/datasets/cifar10_test.npz \\
        --limit 2000 --seeds 0 1 --range 5-15 --preset cpu

Prints one line per case and a summary (exact hits, within one, mean absolute error) and writes
every candidate's score to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scan_engine import pipeline
from scan_engine.cli.overrides import nest_overrides, parse_override, parse_range
from scan_engine.config import PRESETS, make_config
from scan_engine.data import ImageCollection, from_arrays, load_npz
from scan_engine.results import ProgressEvent, StopRequested
from scan_engine.sample_data import make_shapes_arrays

logger = logging.getLogger("validate_k_selection")


def _stop_after_selection() -> tuple[Any, Any]:
    """(progress, should_stop): stop at the first SCAN training step, i.e. once K is chosen."""
    seen: list[ProgressEvent] = []

    def should_stop() -> bool:
        return any(e.stage == "scan" and e.message.startswith("step") for e in seen)

    return seen.append, should_stop


def run_case(
    collection: ImageCollection,
    classes: int,
    span: tuple[int, int],
    preset: str,
    seed: int,
    overrides: dict[str, Any],
    full: bool,
) -> dict[str, Any]:
    config = make_config(preset, num_clusters_range=list(span), seed=seed, **overrides)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kval-") as work:
        progress, should_stop = (None, None) if full else _stop_after_selection()
        final = None
        try:
            result = pipeline.run(
                collection, config, work, progress=progress, should_stop=should_stop
            )
            final = result.report["metrics"]
        except StopRequested:
            pass
        selected = torch.load(Path(work) / "select_k.pt", weights_only=False)["payload"]
        mined = torch.load(Path(work) / "mine.pt", weights_only=False)["payload"]
    chosen = selected["k_selection"]["chosen"]
    return {
        "classes": classes,
        "seed": seed,
        "images": len(collection),
        "range": list(span),
        "chosen": chosen,
        "error": chosen - classes,
        "neighbor_purity": mined["purity"],
        "kmeans_at_chosen": selected.get("kmeans"),
        "final_metrics": final,
        "candidates": selected["k_selection"]["candidates"],
        "seconds": round(time.monotonic() - started, 1),
    }


def summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [abs(case["error"]) for case in cases]
    return {
        "cases": len(cases),
        "exact": sum(e == 0 for e in errors),
        "within_one": sum(e <= 1 for e in errors),
        "mean_abs_error": round(sum(errors) / max(len(errors), 1), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="*", default=[3, 4, 6])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--per-class", type=int, default=50, help="generated images per class")
    parser.add_argument("--npz", type=Path, default=None, help="a labelled benchmark .npz instead")
    parser.add_argument("--limit", type=int, default=2000, help="images drawn from --npz per seed")
    parser.add_argument(
        "--range", type=parse_range, default=None, help="candidates LOW-HIGH; default 2..2·classes"
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--steps-per-pretext",
        type=int,
        default=0,
        help="at least this many SimCLR steps (epochs raised for small collections); 0 = preset",
    )
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[])
    parser.add_argument("--full", action="store_true", help="train to the end, report ACC too")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    jobs: list[tuple[ImageCollection, int, int]] = []
    for seed in args.seeds:
        if args.npz is not None:
            collection = load_npz(args.npz, limit=args.limit, seed=seed)
            assert collection.labels is not None, "the .npz has no labels"
            jobs.append((collection, int(collection.labels.max()) + 1, seed))
        else:
            for classes in args.classes:
                images, labels, names = make_shapes_arrays(classes, args.per_class, 48, seed)
                jobs.append((from_arrays(images, labels, names, image_size=32), classes, seed))
    cases = []
    for collection, classes, seed in jobs:
        overrides = nest_overrides(args.overrides)
        if args.steps_per_pretext:
            preset = make_config(args.preset)
            per_epoch = max(1, len(collection) // preset.pretext.batch_size)
            epochs = max(preset.pretext.epochs, math.ceil(args.steps_per_pretext / per_epoch))
            overrides.setdefault("pretext", {})["epochs"] = epochs
        span = args.range or (2, 2 * classes)
        case = run_case(collection, classes, span, args.preset, seed, overrides, args.full)
        cases.append(case)
        scores = {c["num_clusters"]: c["score"] for c in case["candidates"]}
        print(
            f"classes={classes} seed={seed} n={case['images']} chosen={case['chosen']} "
            f"purity@1={(case['neighbor_purity'] or {}).get('1')} {case['seconds']}s "
            f"scores={scores}",
            flush=True,
        )
    result = {"summary": summary(cases), "cases": cases}
    print(json.dumps(result["summary"]))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
