"""`scan-cluster`: cluster a folder or zip of images from the command line.

    scan-cluster photos/ --clusters 10 --overcluster 2 --out results/

The default preset, pretrained, clusters features of the bundled EfficientNet-Lite0 (streamed,
cached in the work folder); --preset cpu / gpu / paper / tiny train SimCLR from scratch instead.

writes assignments.csv / .json, clusters.json, prototypes/c<C>/cluster_<i>.png and report.json.
Rerunning with the same --out resumes from the last finished stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from scan_engine.cli.overrides import (
    add_override_option,
    nest_overrides,
    parse_overcluster,
    parse_range,
)
from scan_engine.config import PRESETS, ConfigError, default_cluster_range, make_config
from scan_engine.data import ImageCollection, load_collection
from scan_engine.outputs import write_outputs
from scan_engine.results import ProgressEvent
from scan_engine.sources import ImageSources, open_sources

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scan-cluster", description="Cluster images without labels (SCAN)."
    )
    parser.add_argument(
        "input",
        type=Path,
        help="a folder of images (searched recursively), a "
        ".zip of images, or an .npz with an `images` array",
    )
    parser.add_argument(
        "--clusters",
        "-k",
        type=int,
        default=None,
        help="K, the number of groups you want; leave it out to let the run choose K",
    )
    parser.add_argument(
        "--clusters-range",
        type=parse_range,
        default=None,
        metavar="LOW-HIGH",
        help="K unknown: choose K in LOW..HIGH by a label-free score (report.json lists every "
        "candidate's score); without --clusters or this, 2..min(20, images/10)",
    )
    parser.add_argument(
        "--overcluster",
        type=parse_overcluster,
        default=None,
        help="also cluster into C = F·K (e.g. 2) or into each of a list of "
        "counts (e.g. 20,30); useful when K is uncertain",
    )
    parser.add_argument(
        "--preset",
        default="pretrained",
        choices=sorted(PRESETS),
        help="pretrained (default: features of a pretrained backbone, good on a CPU); or "
        "SimCLR from scratch: cpu (a 2-core machine), gpu, paper, tiny (smoke tests)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("scan-results"),
        help="output folder; its work/ subfolder holds resumable checkpoints",
    )
    parser.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="treat top-level folder names as ground truth and report ACC/NMI/ARI",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training resolution (default: the preset's: the backbone's input size for "
        "pretrained, 32 for the scratch presets)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="scale the schedule to finish in about this many seconds",
    )
    parser.add_argument(
        "--backbone-weights",
        type=Path,
        default=None,
        help="a local pretrained ResNet state dict: skips the pretext, freezes "
        "the backbone (nothing is downloaded)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    add_override_option(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _original_loader(source: Path, paths: list[str]) -> Callable[[int], Image.Image | None]:
    """Full-size originals for prototype PNGs, read from the folder or zip on demand."""

    def load(index: int) -> Image.Image | None:
        try:
            if source.is_dir():
                image = Image.open(source / paths[index])
            elif zipfile.is_zipfile(source):
                with zipfile.ZipFile(source) as archive, archive.open(paths[index]) as member:
                    image = Image.open(member)
                    image.load()
            else:
                return None
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((512, 512))
            return image
        except Exception:  # the training-size copy is a fine fallback for a prototype
            return None

    return load


class _ProgressBar:
    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=1000,
                unit="‰",
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {postfix}",
                postfix="?",
            )

    def __call__(self, event: ProgressEvent) -> None:
        if self.bar is None:
            return
        self.bar.set_description_str(f"{event.stage:>9}")
        eta = (
            "?" if event.eta_s is None else f"{int(event.eta_s) // 60}:{int(event.eta_s) % 60:02d}"
        )
        self.bar.postfix = eta
        self.bar.update(int(event.fraction * 1000) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if not args.quiet else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from scan_engine import pipeline  # torch import after argument errors are reported

    overrides = nest_overrides(args.overrides)
    overrides.update(num_clusters=args.clusters, overcluster=args.overcluster, seed=args.seed)
    if args.clusters is not None and args.clusters_range is not None:
        print("scan-cluster: give --clusters or --clusters-range, not both", file=sys.stderr)
        return 2
    if args.clusters is None:  # K chosen by the run; the default range needs the image count
        overrides["num_clusters_range"] = args.clusters_range or (2, 2)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.budget_s is not None:
        overrides["time_budget_s"] = args.budget_s
    if args.backbone_weights is not None:
        overrides["backbone_weights"] = str(args.backbone_weights)
    try:
        config = make_config(args.preset, **overrides)
        collection: ImageCollection | ImageSources
        if config.pretrained_backbone is not None:  # streamed: decoded once, by the backbone
            collection = open_sources(args.input, args.labels_from_folders)
        else:
            collection = load_collection(args.input, config.image_size, args.labels_from_folders)
        if args.clusters is None and args.clusters_range is None:
            overrides["num_clusters_range"] = default_cluster_range(len(collection))
            config = make_config(args.preset, **overrides)
    except (ConfigError, FileNotFoundError, ValueError, zipfile.BadZipFile) as error:
        print(f"scan-cluster: {error}", file=sys.stderr)
        return 2
    for skipped in collection.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    print(
        f"{len(collection)} images loaded ({len(collection.skipped)} skipped); "
        + (
            f"choosing K among {config.candidate_counts()}"
            if config.num_clusters_range is not None
            else f"clustering into {config.cluster_counts()}"
        ),
        file=sys.stderr,
    )
    bar = _ProgressBar(not args.quiet)
    try:
        result = pipeline.run(
            collection, config, args.out / "work", progress=bar, device=args.device
        )
    except ConfigError as error:
        bar.close()
        print(f"scan-cluster: {error}", file=sys.stderr)
        return 2
    bar.close()
    rows = result.rows if result.rows is not None else collection
    write_outputs(result, rows, args.out, _original_loader(args.input, rows.paths))
    summary = {
        "out": str(args.out),
        "timings_s": result.report["timings_s"],
        "metrics": result.report["metrics"],
        "notes": result.notes,
    }
    if result.k_selection is not None:  # K chosen by the run: the choice and every score
        summary["k_selection"] = {
            "chosen": result.k_selection["chosen"],
            "scores": {c["num_clusters"]: c["score"] for c in result.k_selection["candidates"]},
        }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
