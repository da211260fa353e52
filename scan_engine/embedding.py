"""Streaming feature extraction for the pretrained route: decode -> resize -> batch -> features.

The collection is never held as pixels. A thread pool decodes and resizes items (Pillow releases
the GIL) into a window of at most `PREFETCH_BATCHES` batches; the calling thread normalises each
batch, runs the frozen backbone under the runtime's policy (channels_last, bf16 autocast where
the CPU or GPU has it, inference mode) and writes float16 rows into a preallocated (N, D) array.
Pixel memory is bounded by batch_size x (1 + views) x 3 x S x S x (1 + PREFETCH_BATCHES), never N.

The plain view is timm's eval transform: shorter side to floor(S / crop_pct), centre crop S (done
as one antialiased resize of the matching box). Augmented views (for self-labeling on cached
features) are a random resized crop, a horizontal flip and a mild colour jitter, drawn per image
from (seed, item index), so they do not depend on thread timing and one decode serves them all.

Features are kept raw (not unit-normalised): the caller normalises for kNN, and heads may want
the raw scale.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import nn

from scan_engine.data import ImageDecodeError, SkippedFile
from scan_engine.results import StopRequested
from scan_engine.runtime import Runtime
from scan_engine.sources import ImageSources, open_rgb

__all__ = [
    "PREFETCH_BATCHES",
    "Preprocessing",
    "EmbeddedFeatures",
    "embed_sources",
    "eval_view",
    "augmented_view",
    "prepare_item",
]

logger = logging.getLogger(__name__)

# Decoded batches waiting for the backbone: enough that the decoders keep working while it runs.
PREFETCH_BATCHES = 2

# Augmented views: milder than SimCLR's (scale 0.2-1, jitter 0.4), since these are views of a
# frozen backbone's input that self-labeling should still recognise as the same image.
AUGMENT_SCALE = (0.35, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)
AUGMENT_JITTER = 0.2  # brightness, contrast and saturation factors drawn in 1 +- this

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input: size, normalisation and the eval crop."""

    input_size: int
    mean: tuple[float, ...]  # 3 values, RGB, in 0..1 units
    std: tuple[float, ...]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.input_size, bool) or int(self.input_size) != self.input_size:
            raise ValueError(f"input_size must be an int, got {self.input_size!r}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {self.input_size}")
        object.__setattr__(self, "input_size", int(self.input_size))
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {values}")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _RESAMPLING:
            raise ValueError(
                f"interpolation must be one of {sorted(_RESAMPLING)}, not {self.interpolation!r}"
            )

    @classmethod
    def from_spec(cls, spec: Any) -> Preprocessing:
        """From any object with input_size, mean, std, crop_pct and interpolation (a backbone's
        spec), so that this module needs no backbone registry."""
        return cls(
            input_size=spec.input_size,
            mean=tuple(spec.mean),
            std=tuple(spec.std),
            crop_pct=spec.crop_pct,
            interpolation=spec.interpolation,
        )

    @property
    def scale_size(self) -> int:
        """The shorter side before the centre crop (timm: floor(input_size / crop_pct))."""
        return math.floor(self.input_size / self.crop_pct)

    @property
    def resample(self) -> Image.Resampling:
        return _RESAMPLING[self.interpolation]

    def describe(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


@dataclass(eq=False, repr=False)
class EmbeddedFeatures:
    """Backbone features of the usable items of a collection, row i for `ids[i]`.

    `positions[i]` is that item's index in the sources; labels (when the sources had them) are
    carried over for the embedded rows. `skipped` holds every item left out: refused at listing
    or failed to read/decode while streaming, with the reason.
    """

    features: torch.Tensor  # (N, D) float16, plain eval view, raw (not unit-normalised)
    augmented: torch.Tensor | None  # (V, N, D) float16 or None
    ids: list[str]
    positions: np.ndarray  # (N,) int64
    skipped: list[SkippedFile] = field(default_factory=list)
    images_per_s: float = 0.0
    labels: np.ndarray | None = None  # (N,) int64
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.features.dtype != torch.float16 or self.features.ndim != 2:
            raise ValueError(f"features must be (N, D) float16, got {self.features.dtype}")
        if self.features.shape[0] != n or self.positions.shape != (n,):
            raise ValueError(
                f"{n} ids but {self.features.shape[0]} feature rows and"
                f" {self.positions.shape} positions"
            )
        if self.augmented is not None and (
            self.augmented.dtype != torch.float16
            or self.augmented.ndim != 3
            or self.augmented.shape[1:] != self.features.shape
        ):
            raise ValueError(
                f"augmented must be (V, {n}, {self.features.shape[1]}) float16,"
                f" got {self.augmented.dtype} {tuple(self.augmented.shape)}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        views = 0 if self.augmented is None else self.augmented.shape[0]
        return (
            f"EmbeddedFeatures(n={len(self)}, dim={self.features.shape[1]}, views={views},"
            f" skipped={len(self.skipped)}, images_per_s={self.images_per_s:.1f})"
        )

    @property
    def num_views(self) -> int:
        return 0 if self.augmented is None else int(self.augmented.shape[0])

    def with_labels_from(self, sources: ImageSources) -> EmbeddedFeatures:
        """Set labels and class names from `sources` by position (in place); returns self."""
        self.labels = None if sources.labels is None else sources.labels[self.positions].copy()
        self.class_names = None if sources.class_names is None else list(sources.class_names)
        return self


# ---------------------------------------------------------------------------------------------
# One image -> views (runs in the decode threads)


def eval_view(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """timm's eval transform as one resize: (S, S, 3) uint8 from the centre of an RGB picture.

    timm resizes the shorter side to `scale_size` (the longer one truncated to an int) and crops
    the centre S x S (offsets rounded); the same box, mapped back onto the source picture, is
    resized in one pass with the same filter scale, so the pixels agree to about one level.
    """
    width, height = image.size
    size, scale = preprocessing.input_size, preprocessing.scale_size
    if width <= height:
        resized_w, resized_h = scale, int(scale * height / width)
    else:
        resized_w, resized_h = int(scale * width / height), scale
    left = int(round((resized_w - size) / 2.0)) * width / resized_w
    top = int(round((resized_h - size) / 2.0)) * height / resized_h
    box = (left, top, left + size * width / resized_w, top + size * height / resized_h)
    return _resize_box(image, box, preprocessing)


def augmented_view(
    image: Image.Image, preprocessing: Preprocessing, rng: np.random.Generator
) -> np.ndarray:
    """Random resized crop, horizontal flip, mild colour jitter: (S, S, 3) uint8."""
    view = Image.fromarray(_resize_box(image, _random_box(image.size, rng), preprocessing))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    brightness, contrast, saturation = rng.uniform(1 - AUGMENT_JITTER, 1 + AUGMENT_JITTER, 3)
    view = ImageEnhance.Brightness(view).enhance(float(brightness))
    view = ImageEnhance.Contrast(view).enhance(float(contrast))
    view = ImageEnhance.Color(view).enhance(float(saturation))
    return np.asarray(view, dtype=np.uint8)


def _resize_box(
    image: Image.Image, box: tuple[float, float, float, float], preprocessing: Preprocessing
) -> np.ndarray:
    size = preprocessing.input_size
    # reducing_gap: an integer pre-shrink first when the factor is >= 3 (fast, visually equal).
    resized = image.resize((size, size), preprocessing.resample, box=box, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _random_box(
    image_size: tuple[int, int], rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """A random crop box of AUGMENT_SCALE of the area at AUGMENT_RATIO (torchvision's rule)."""
    width, height = image_size
    area = width * height
    log_low, log_high = math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*AUGMENT_SCALE)
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w, crop_h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if crop_w <= width and crop_h <= height:
            left = rng.uniform(0, width - crop_w)
            top = rng.uniform(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    side = min(width, height)  # a very elongated picture: the centre square
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def prepare_item(
    sources: ImageSources, index: int, preprocessing: Preprocessing, views: int, seed: int
) -> np.ndarray:
    """Read and decode item `index` once: (1 + views, S, S, 3) uint8, plain view first.

    Raises ImageDecodeError when the item cannot be used.
    """
    image = open_rgb(sources.read(index), preprocessing.scale_size)
    size = preprocessing.input_size
    out = np.empty((1 + views, size, size, 3), dtype=np.uint8)
    out[0] = eval_view(image, preprocessing)
    if views:
        rng = np.random.default_rng([seed, index])
        for view in range(views):
            out[1 + view] = augmented_view(image, preprocessing, rng)
    return out


# ---------------------------------------------------------------------------------------------
# Many images -> features


def embed_sources(
    sources: ImageSources,
    module: nn.Module,
    *,
    preprocessing: Preprocessing,
    runtime: Runtime,
    batch_size: int | None = None,
    decode_workers: int = 2,
    augmented_views: int = 0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    items: range | None = None,
) -> EmbeddedFeatures:
    """Stream every item of `sources` through `module` (a frozen backbone giving (B, D)).

    `module` is moved to the runtime's device and layout and put in eval mode. Items that cannot
    be read or decoded are skipped and reported. `progress(done, total)` is called after each
    batch (items done, skipped ones included); when `should_stop()` turns true, StopRequested is
    raised before the next batch. `batch_size` None: the runtime's inference batch size.

    `items`: only these item positions (a shard of the collection, step 1). Rows keep their
    positions in the whole collection and views are seeded by them, so shards embedded apart
    and put together (scan_engine.feature_shards) equal one pass over everything.
    """
    if batch_size is None:
        batch_size = runtime.inference_batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if decode_workers < 1:
        raise ValueError(f"decode_workers must be >= 1, got {decode_workers}")
    if augmented_views < 0:
        raise ValueError(f"augmented_views must be >= 0, got {augmented_views}")
    if items is None:
        items = range(len(sources))
    if items.step != 1 or (len(items) and (items.start < 0 or items.stop > len(sources))):
        raise ValueError(f"items must be a step-1 range within 0..{len(sources)}, got {items}")
    embedder = _BatchEmbedder(module, preprocessing, runtime, len(items), augmented_views)
    started = time.perf_counter()
    total = len(items)
    size = preprocessing.input_size
    # (1 + V, B, S, S, 3) uint8: one reused batch buffer, each view's slab contiguous (NHWC).
    batch = np.empty((1 + augmented_views, batch_size, size, size, 3), dtype=np.uint8)
    filled = 0
    positions: list[int] = []
    skipped: list[SkippedFile] = []
    window = batch_size * PREFETCH_BATCHES
    pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="embed-decode")
    pending: deque[tuple[int, Future[np.ndarray]]] = deque()
    next_index, end = items.start, items.stop
    try:
        while pending or next_index < end:
            while next_index < end and len(pending) < window:
                future = pool.submit(
                    prepare_item, sources, next_index, preprocessing, augmented_views, seed
                )
                pending.append((next_index, future))
                next_index += 1
            index, future = pending.popleft()
            try:
                batch[:, filled] = future.result()
            except ImageDecodeError as exc:
                skipped.append(SkippedFile(sources.paths[index], str(exc)))
                continue
            positions.append(index)
            filled += 1
            if filled == batch_size:
                _check_stop(should_stop)
                embedder.add(batch)
                filled = 0
                if progress is not None:
                    progress(index + 1 - items.start, total)
        if filled:
            _check_stop(should_stop)
            embedder.add(batch[:, :filled])
        if progress is not None:
            progress(total, total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - started
    features, augmented = embedder.result()
    for item in skipped:
        logger.debug("skipped %s: %s", item.path, item.reason)
    rate = len(positions) / elapsed if elapsed > 0 else 0.0
    logger.info(
        "embedded %d images (%d views each) at %.1f images/s, skipped %d",
        len(positions),
        1 + augmented_views,
        rate,
        len(skipped),
    )
    embedded = EmbeddedFeatures(
        features=features,
        augmented=augmented,
        ids=[sources.ids[i] for i in positions],
        positions=np.asarray(positions, dtype=np.int64),
        skipped=sorted([*sources.skipped, *skipped], key=lambda item: item.path),
        images_per_s=rate,
    )
    return embedded.with_labels_from(sources)


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise StopRequested("stopped while computing features")


class _BatchEmbedder:
    """Runs batches of uint8 views through the module into preallocated float16 outputs."""

    def __init__(
        self,
        module: nn.Module,
        preprocessing: Preprocessing,
        runtime: Runtime,
        capacity: int,
        views: int,
    ) -> None:
        self.module = runtime.prepare(module).eval()
        self.runtime = runtime
        self.preprocessing = preprocessing
        self.capacity = capacity
        self.views = views
        device = runtime.device
        # Normalise from 0..255 directly: (x / 255 - mean) / std == (x - 255 mean) / (255 std).
        self.mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1) * 255.0
        self.outputs: torch.Tensor | None = None  # (1 + V, capacity, D) float16, made lazily
        self.written = 0

    def _forward(self, views_u8: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, D) float32 features on the CPU."""
        # uint8 crosses to the device (4x less than float); NHWC permuted is channels_last.
        pixels = torch.from_numpy(views_u8).to(self.runtime.device).permute(0, 3, 1, 2)
        pixels = (pixels.float() - self.mean) / self.std
        if self.runtime.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        else:
            pixels = pixels.contiguous()
        with torch.inference_mode(), self.runtime.autocast():
            out = self.module(pixels)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(views_u8):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the backbone must return (B, D) pooled features, got {shape}"
                " (create it without a classifier, e.g. timm num_classes=0)"
            )
        out = out.float().cpu()
        if not torch.isfinite(out).all():
            raise FloatingPointError("the backbone returned non-finite features")
        return out

    def add(self, batch: np.ndarray) -> None:
        """(1 + V, B, S, S, 3) uint8 views of the next B items."""
        count = batch.shape[1]
        for view in range(batch.shape[0]):
            out = self._forward(batch[view])  # (B, D)
            if self.outputs is None:
                shape = (1 + self.views, self.capacity, out.shape[1])
                self.outputs = torch.empty(shape, dtype=torch.float16)
            self.outputs[view, self.written : self.written + count] = out.to(torch.float16)
        self.written += count

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.outputs is None:  # nothing embedded: learn D from one blank image
            size = self.preprocessing.input_size
            dim = self._forward(np.zeros((1, size, size, 3), dtype=np.uint8)).shape[1]
            self.outputs = torch.empty((1 + self.views, 0, dim), dtype=torch.float16)
        outputs = self.outputs[:, : self.written]
        if self.written < self.capacity:  # skipped items: drop the unused rows' memory
            outputs = outputs.clone()
        features = outputs[0]
        augmented = outputs[1:] if self.views else None
        return features, augmented
