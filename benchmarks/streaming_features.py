"""Images/s and peak RSS of the streaming feature extractor on real-size JPEGs, one JSON document.

    python benchmarks/streaming_features.py --folder /tmp/photos --n 200            # smoke
    python benchmarks/streaming_features.py --folder /tmp/photos --n 2000 20000     # the curve

Photo-like 640x480 JPEGs (gradients, shapes, noise) are written once into `--folder` and reused.
Each N runs in a fresh process, so its peak RSS (VmHWM) is its own; RSS is also sampled after
every batch, giving RSS against images embedded (flat when nothing grows with N but the
(N, D) float16 features). Run on a quiet machine: the decoders and the backbone share the cores.
The backbone has random weights (timm, pretrained=False): speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger("benchmarks.streaming_features")

PHOTOS_PER_FOLDER = 1000  # keeps directories small at 100k files


def photo_path(folder: Path, index: int) -> Path:
    return folder / f"{index // PHOTOS_PER_FOLDER:03d}" / f"{index:06d}.jpg"


def make_photo(index: int, width: int, height: int) -> Image.Image:
    """A deterministic photo-like picture: a sky/ground gradient, a few shapes, sensor noise."""
    rng = np.random.default_rng(index)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    rows = np.linspace(0.0, 1.0, height)[:, None, None]  # (H, 1, 1)
    columns = np.linspace(-0.15, 0.15, width)[None, :, None]  # (1, W, 1) a little side light
    base = top * (1 - rows) + bottom * rows + 255 * columns  # (H, W, 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def ensure_photos(folder: Path, count: int, width: int, height: int, threads: int) -> list[Path]:
    """The first `count` photos under `folder`, writing the missing ones (JPEG quality 90)."""
    paths = [photo_path(folder, i) for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if missing:
        logger.info("writing %d photos to %s", len(missing), folder)
        started = time.perf_counter()

        def write(index: int) -> None:
            path = paths[index]
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            make_photo(index, width, height).save(temporary, format="JPEG", quality=90)
            temporary.replace(path)  # an interrupted run leaves no half-written photo

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(write, missing))
        logger.info("wrote them in %.1f s", time.perf_counter() - started)
    return paths


def _status_mb(field: str) -> float:
    """A field of /proc/self/status in MB (VmRSS: now, VmHWM: peak since the process began)."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def measure(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """One N in this process: load the backbone, stream the first `count` photos, report."""
    import timm
    import torch

    from scan_engine.embedding import Preprocessing, embed_sources
    from scan_engine.runtime import cpu_fields, resolve_runtime
    from scan_engine.sources import ImageSources

    paths = [photo_path(args.folder, i) for i in range(count)]
    sources = ImageSources.from_files([(path.stem, path) for path in paths])
    runtime = resolve_runtime(args.device, args.precision)
    module = timm.create_model(args.backbone, pretrained=False, num_classes=0)
    config: dict[str, Any] = dict(getattr(module, "pretrained_cfg", {}))
    rss_before = _status_mb("VmRSS")
    curve: list[tuple[int, float]] = []
    sample_every = max(1, count // 40)

    def progress(done: int, total: int) -> None:
        if not curve or done - curve[-1][0] >= sample_every or done == total:
            curve.append((done, round(_status_mb("VmRSS"), 1)))

    started = time.perf_counter()
    embedded = embed_sources(
        sources,
        module,
        preprocessing=Preprocessing(
            input_size=args.size,
            mean=config.get("mean", (0.485, 0.456, 0.406)),
            std=config.get("std", (0.229, 0.224, 0.225)),
            crop_pct=config.get("crop_pct", 0.875),
            interpolation=config.get("interpolation", "bicubic"),
        ),
        runtime=runtime,
        batch_size=args.batch_size,
        decode_workers=args.decode_workers,
        augmented_views=args.views,
        progress=progress,
    )
    wall = time.perf_counter() - started
    features_mb = embedded.features.numel() * 2 / 2**20
    if embedded.augmented is not None:
        features_mb += embedded.augmented.numel() * 2 / 2**20
    return {
        "n": count,
        "embedded": len(embedded),
        "skipped": len(embedded.skipped),
        "wall_s": round(wall, 2),
        "images_per_s": round(embedded.images_per_s, 1),
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "features_mb": round(features_mb, 1),
        "rss_curve": curve,  # [images done, RSS MB] after batches
        "machine": {
            "cpu": cpu_fields().get("model name", "unknown"),
            "torch": torch.__version__,
            **runtime.describe(),
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="where the photos live")
    parser.add_argument("--n", type=int, nargs="+", default=[200], help="collection sizes")
    parser.add_argument("--size", type=int, default=224, help="backbone input size (px)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="a timm model name")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the runtime's")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--views", type=int, default=0, help="augmented views per image")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32"])
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--write-threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:  # one N, measured in a fresh process by the parent below
        print(json.dumps(measure(args, args.n[0])))
        return 0
    ensure_photos(args.folder, max(args.n), args.width, args.height, args.write_threads)
    runs = []
    for count in args.n:
        given = list(argv if argv is not None else sys.argv[1:])
        command = [sys.executable, __file__, *given, "--child", "--n", str(count)]  # last --n wins
        # stdout carries the JSON line; the child's log goes straight to our stderr.
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        logger.info(
            "n=%d: %.1f images/s, peak RSS %.0f MB",
            count,
            runs[-1]["images_per_s"],
            runs[-1]["peak_rss_mb"],
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "n", "folder")}
    document = {"benchmark": "streaming_features", "settings": settings, "runs": runs}
    print(json.dumps(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
