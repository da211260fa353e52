"""A small labelled image collection of coloured shapes, written as real image files.

Each class has its own shape AND its own dominant colour (red circle, green square, blue triangle,
yellow cross, ...), so a small CNN trained briefly with SimCLR separates them even though colour
jitter and grayscale augmentations hide part of the colour cue. Every image draws a random
position, size, rotation, background tint and gradient, a slight colour variation and pixel
noise. Used by engine, service and browser tests and by the README demo.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLOURS",
    "shape_class_names",
    "render_shape_image",
    "make_shapes_arrays",
    "make_shapes_collection",
    "make_shapes_zip",
]

logger = logging.getLogger(__name__)

# Class i is SHAPES[i] in COLOURS[i]: the first six differ in both at once and are the easiest.
# Shapes are chosen to stay different under any rotation (no square vs diamond, no + vs x).
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "bars",
    "crescent",
    "frame",
    "heart",
    "arrow",
    "dots",
)
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (225, 30, 30)),
    ("green", (30, 170, 50)),
    ("blue", (30, 70, 230)),
    ("yellow", (245, 220, 30)),
    ("magenta", (220, 40, 210)),
    ("cyan", (30, 210, 220)),
    ("orange", (255, 135, 0)),
    ("purple", (115, 35, 175)),
    ("brown", (125, 75, 25)),
    ("pink", (255, 150, 200)),
    ("black", (20, 20, 20)),
    ("white", (245, 245, 245)),
)
_SAVE_FORMATS = {
    "png": ("PNG", {}),
    "jpg": ("JPEG", {"quality": 90}),
    "jpeg": ("JPEG", {"quality": 90}),
    "webp": ("WEBP", {"quality": 90}),
    "bmp": ("BMP", {}),
    "gif": ("GIF", {}),
    "tif": ("TIFF", {}),
    "tiff": ("TIFF", {}),
}
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth, antialiased edges

# A shape is a list of primitives in unit coordinates (centre 0,0, radius about 1, y down):
# (points, disc radius, fill): a polygon when the radius is 0, else a disc around the one point;
# fill 255 adds to the mask, 0 cuts a hole.
_Primitive = tuple[list[tuple[float, float]], float, int]


def _regular(count: int, radius: float, start_deg: float = -90.0) -> list[tuple[float, float]]:
    step = 2 * math.pi / count
    start = math.radians(start_deg)
    return [
        (radius * math.cos(start + i * step), radius * math.sin(start + i * step))
        for i in range(count)
    ]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, -90.0 + 36.0)
    return [point for pair in zip(outer, inner, strict=True) for point in pair]


_SHAPE_PRIMITIVES: dict[str, list[_Primitive]] = {
    "circle": [([(0.0, 0.0)], 0.9, 255)],
    "square": [(_rect(-0.78, -0.78, 0.78, 0.78), 0.0, 255)],
    "triangle": [(_regular(3, 1.0), 0.0, 255)],
    "cross": [
        (_rect(-1.0, -0.28, 1.0, 0.28), 0.0, 255),
        (_rect(-0.28, -1.0, 0.28, 1.0), 0.0, 255),
    ],
    "ring": [([(0.0, 0.0)], 0.95, 255), ([(0.0, 0.0)], 0.55, 0)],
    "star": [(_star(), 0.0, 255)],
    "bars": [
        (_rect(-0.9, -0.9, 0.9, -0.52), 0.0, 255),
        (_rect(-0.9, -0.19, 0.9, 0.19), 0.0, 255),
        (_rect(-0.9, 0.52, 0.9, 0.9), 0.0, 255),
    ],
    "crescent": [([(0.0, 0.0)], 0.95, 255), ([(0.45, -0.2)], 0.78, 0)],
    "frame": [
        (_rect(-0.85, -0.85, 0.85, 0.85), 0.0, 255),
        (_rect(-0.45, -0.45, 0.45, 0.45), 0.0, 0),
    ],
    "heart": [
        ([(-0.42, -0.3)], 0.5, 255),
        ([(0.42, -0.3)], 0.5, 255),
        ([(-0.9, -0.12), (0.9, -0.12), (0.0, 0.95)], 0.0, 255),
    ],
    "arrow": [
        (
            [(-0.95, -0.26), (0.05, -0.26), (0.05, -0.7), (0.95, 0.0), (0.05, 0.7), (0.05, 0.26)]
            + [(-0.95, 0.26)],
            0.0,
            255,
        )
    ],
    "dots": [([point], 0.32, 255) for point in _regular(3, 0.62)],
}


def shape_class_names(classes: int = 4) -> list[str]:
    """Names of the first `classes` classes, e.g. ["red_circle", "green_square", ...]."""
    _check_classes(classes)
    return [f"{COLOURS[i][0]}_{SHAPES[i]}" for i in range(classes)]


def _check_classes(classes: int) -> None:
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be between 1 and {len(SHAPES)}, got {classes}")


def _shape_mask(
    shape: str, image_size: int, centre: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    """Coverage of the shape, (S, S) float32 in 0..1, antialiased by supersampling."""
    canvas = image_size * _SUPERSAMPLE
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    cos, sin = math.cos(angle), math.sin(angle)
    scale = radius * _SUPERSAMPLE
    cx, cy = centre[0] * _SUPERSAMPLE, centre[1] * _SUPERSAMPLE

    def place(x: float, y: float) -> tuple[float, float]:  # unit coords -> rotated canvas coords
        return cx + scale * (cos * x - sin * y), cy + scale * (sin * x + cos * y)

    for points, disc_radius, fill in _SHAPE_PRIMITIVES[shape]:
        placed = [place(x, y) for x, y in points]
        if disc_radius == 0.0:
            draw.polygon(placed, fill=fill)
        else:
            (px, py), r = placed[0], disc_radius * scale
            draw.ellipse([px - r, py - r, px + r, py + r], fill=fill)
    small = mask.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_shape_image(class_index: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One random image of class `class_index`: (S, S, 3) uint8 RGB."""
    _check_classes(class_index + 1)
    size = image_size
    # Background: a muted grey with a colour tint and a linear gradient in a random direction.
    grey = rng.uniform(85.0, 175.0)
    tint = rng.uniform(-22.0, 22.0, size=3)
    direction = rng.uniform(0.0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gradient = math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]  # (S, S)
    background = grey + tint[None, None, :] + rng.uniform(0.0, 25.0) * gradient[:, :, None]

    # Shape: radius 22-36 % of the side, kept inside the image, any rotation.
    radius = rng.uniform(0.22, 0.36) * size
    centre = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
    mask = _shape_mask(SHAPES[class_index], size, centre, radius, rng.uniform(0.0, 2 * math.pi))
    colour = np.asarray(COLOURS[class_index][1], dtype=np.float32) + rng.uniform(-18, 18, size=3)

    # (S, S, 3): blend shape over background, then sensor-like noise.
    alpha = mask[:, :, None]
    pixels = background * (1.0 - alpha) + colour[None, None, :] * alpha
    pixels = pixels + rng.normal(0.0, rng.uniform(2.0, 9.0), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _image_rng(seed: int, class_index: int, number: int) -> np.random.Generator:
    # One stream per image: adding classes or images never changes the images already made.
    return np.random.default_rng([seed, class_index, number])


def _check_arguments(classes: int, per_class: int, image_size: int) -> None:
    _check_classes(classes)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")


def make_shapes_arrays(
    classes: int = 4, per_class: int = 60, image_size: int = 48, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The same images in memory: (images (N, S, S, 3) uint8, labels (N,) int64, class_names).

    Class-major order, N = classes * per_class; the pixels equal the PNG files'.
    """
    _check_arguments(classes, per_class, image_size)
    images = np.empty((classes * per_class, image_size, image_size, 3), dtype=np.uint8)
    for c in range(classes):
        for n in range(per_class):
            images[c * per_class + n] = render_shape_image(c, image_size, _image_rng(seed, c, n))
    labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    return images, labels, shape_class_names(classes)


def _encoded_files(
    classes: int, per_class: int, image_size: int, seed: int, formats: Sequence[str]
) -> Iterator[tuple[str, bytes]]:
    """(relative path "<class_name>/<nnnn>.<ext>", encoded bytes), formats taken in turn."""
    _check_arguments(classes, per_class, image_size)
    formats = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in formats if f not in _SAVE_FORMATS]
    if not formats or unknown:
        raise ValueError(f"formats must be some of {sorted(_SAVE_FORMATS)}, got {formats}")
    for c, class_name in enumerate(shape_class_names(classes)):
        for n in range(per_class):
            pixels = render_shape_image(c, image_size, _image_rng(seed, c, n))
            extension = formats[n % len(formats)]
            pil_format, options = _SAVE_FORMATS[extension]
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format=pil_format, **options)
            yield f"{class_name}/{n:04d}.{extension}", buffer.getvalue()


def make_shapes_collection(
    root: str | Path,
    classes: int = 4,
    per_class: int = 60,
    image_size: int = 48,
    seed: int = 0,
    formats: Sequence[str] = ("png", "jpg"),
) -> Path:
    """Write <root>/<class_name>/<nnnn>.<ext> image files and return `root`.

    `classes` (1..12) picks the first classes of SHAPES x COLOURS; formats alternate per image
    (png, jpg, webp, bmp, gif, tif). The same arguments always give the same pixels.
    """
    root = Path(root)
    count = 0
    for relative, payload in _encoded_files(classes, per_class, image_size, seed, formats):
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        count += 1
    logger.info("wrote %d shape images in %d classes to %s", count, classes, root)
    return root


def make_shapes_zip(
    zip_path: str | Path,
    classes: int = 4,
    per_class: int = 60,
    image_size: int = 48,
    seed: int = 0,
    formats: Sequence[str] = ("png", "jpg"),
) -> Path:
    """The same collection as make_shapes_collection, as a zip with entries <class_name>/<file>.

    Entries carry a fixed timestamp, so equal arguments give a byte-identical zip.
    """
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for relative, payload in _encoded_files(classes, per_class, image_size, seed, formats):
            info = zipfile.ZipInfo(relative, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, payload)
    logger.info("wrote %d classes x %d shape images to %s", classes, per_class, zip_path)
    return zip_path


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m scan_engine.sample_data OUT [--zip] [--classes N] [--per-class M]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a labelled sample collection of shapes.")
    parser.add_argument("out", type=Path, help="a folder, or a .zip path with --zip")
    parser.add_argument("--zip", action="store_true", help="write one zip instead of a folder")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    make = make_shapes_zip if args.zip else make_shapes_collection
    written = make(
        args.out, classes=args.classes, per_class=args.per_class, image_size=args.image_size
    )
    print(written)


if __name__ == "__main__":
    main()
