"""Tests for scan_engine.embedding: streaming features equal a naive full-batch reference, memory
stays bounded by the batch (never N), skipped files are reported, augmented views are seeded."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from scan_engine.embedding import (
    PREFETCH_BATCHES,
    EmbeddedFeatures,
    Preprocessing,
    embed_sources,
    eval_view,
)
from scan_engine.results import StopRequested
from scan_engine.runtime import resolve_runtime
from scan_engine.sources import ImageSources, open_rgb

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FLOAT32 = resolve_runtime("cpu", "float32")


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class BatchSpy(nn.Module):
    """Wraps a module and records, at each forward, the batch size and how many items the
    sources had read by then."""

    def __init__(self, inner: nn.Module, reads: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self.reads = reads
        self.calls: list[tuple[int, int]] = []  # (batch size, items read so far)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], len(self.reads)))
        return self.inner(x)


def photo(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(0, 255, 3) * x + rng.uniform(0, 255, 3) * (1 - y)
    image = Image.fromarray(np.clip(base / 2, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        box = (x0, y0, x0 + width // 3, y0 + height // 3)
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


@pytest.fixture()
def photo_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i, (width, height) in enumerate([(80, 60), (60, 90), (64, 64), (120, 50), (70, 70)]):
        folder = root / ("beach" if i % 2 else "city")
        folder.mkdir(parents=True, exist_ok=True)
        image = photo(i, width, height)
        if i == 2:
            image = image.convert("L")  # grayscale goes through the same RGB rule
        fmt = "JPEG" if i % 2 else "PNG"
        image.save(folder / f"{i}.{fmt.lower()}", format=fmt)
    (root / "city" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # sorts last
    (root / "beach" / "readme.txt").write_text("not an image")
    return root


def reference_features(
    images: list[Image.Image], module: nn.Module, preprocessing: Preprocessing
) -> torch.Tensor:
    """All images as one float32 batch through the module, no streaming: (N, D)."""
    pixels = np.stack([eval_view(image, preprocessing) for image in images])  # (N, S, S, 3)
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    batch = (batch - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return module.eval()(batch)


def embed(sources: ImageSources, module: nn.Module, **options: object) -> EmbeddedFeatures:
    """embed_sources with the tests' defaults; preprocessing fields may be given one by one."""
    fields: dict[str, object] = {"input_size": 32, "mean": MEAN, "std": STD}
    for name in ("input_size", "mean", "std", "crop_pct", "interpolation"):
        if name in options:
            fields[name] = options.pop(name)
    settings: dict[str, object] = {
        "preprocessing": Preprocessing(**fields),  # type: ignore[arg-type]
        "runtime": FLOAT32,
        "batch_size": 2,
    }
    settings.update(options)
    return embed_sources(sources, module, **settings)  # type: ignore[arg-type]


def test_streaming_equals_a_full_batch_reference_and_reports_skipped(photo_folder: Path) -> None:
    sources = ImageSources.from_folder(photo_folder, labels_from_folders=True)
    module = tiny_backbone()
    embedded = embed(sources, module, batch_size=2, decode_workers=3)

    good = [i for i, path in enumerate(sources.paths) if path.split("/")[1][0].isdigit()]
    assert embedded.ids == [sources.ids[i] for i in good]
    assert embedded.positions.tolist() == good
    assert embedded.labels.tolist() == sources.labels[good].tolist()
    assert embedded.class_names == ["beach", "city"]
    reasons = {item.path: item.reason for item in embedded.skipped}
    assert set(reasons) == {"beach/readme.txt", "city/zz_broken.jpg"}
    assert "not an image" in reasons["beach/readme.txt"]

    preprocessing = Preprocessing(32, MEAN, STD)
    images = [open_rgb(sources.read(i), preprocessing.scale_size) for i in good]
    expected = reference_features(images, module, preprocessing)
    assert embedded.features.dtype == torch.float16
    assert embedded.features.shape == expected.shape == (len(good), 16)
    torch.testing.assert_close(embedded.features.float(), expected, rtol=2e-3, atol=2e-3)
    assert embedded.augmented is None
    assert embedded.images_per_s > 0


def test_channels_last_runtime_gives_the_same_features(photo_folder: Path) -> None:
    sources = ImageSources.from_folder(photo_folder)
    auto = resolve_runtime("cpu", "auto")
    plain = embed(sources, tiny_backbone(), runtime=FLOAT32).features.float()
    tuned = embed(sources, tiny_backbone(), runtime=auto, batch_size=3).features.float()
    tolerance = 3e-2 if auto.amp_dtype is not None else 2e-3  # bf16 autocast where native
    torch.testing.assert_close(tuned, plain, rtol=tolerance, atol=tolerance)


def test_plain_view_matches_timms_eval_transform() -> None:
    from timm.data import create_transform

    preprocessing = Preprocessing(48, MEAN, STD, crop_pct=0.9, interpolation="bicubic")
    transform = create_transform(
        48, crop_pct=0.9, interpolation="bicubic", mean=MEAN, std=STD, is_training=False
    )
    for seed, size in enumerate([(100, 75), (64, 96), (53, 53), (640, 480)]):
        image = photo(seed, *size)
        ours = eval_view(image, preprocessing).astype(np.float64)
        theirs = transform(image).numpy().transpose(1, 2, 0) * np.array(STD) + np.array(MEAN)
        difference = np.abs(ours - theirs * 255.0)
        # The same box and filter scale: equal pixels up to rounding (one level).
        assert difference.mean() < 0.2 and np.percentile(difference, 99) <= 1.0 + 1e-4


def test_streaming_holds_a_few_batches_never_the_collection() -> None:
    count, batch_size, size = 300, 8, 16
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    reads: list[int] = []
    array_sources = ImageSources.from_array(images)

    def counting_reader(index: int) -> np.ndarray:
        reads.append(index)
        return array_sources.read(index)

    sources = ImageSources(
        ids=array_sources.ids,
        paths=array_sources.paths,
        reader=counting_reader,
        signer=array_sources.signature,
        kind="array",
    )
    spy = BatchSpy(tiny_backbone(), reads)
    embedded = embed(
        sources, spy, input_size=size, crop_pct=1.0, batch_size=batch_size, decode_workers=2
    )
    assert embedded.features.shape == (count, 16)
    assert sorted(reads) == list(range(count))
    assert len(spy.calls) == count // batch_size + 1  # 37 full batches and one of 4
    assert max(batch for batch, _ in spy.calls) == batch_size
    bound = batch_size * (1 + PREFETCH_BATCHES)  # the batch in hand + the decode window
    embedded_before = 0
    for batch, read_so_far in spy.calls:
        assert read_so_far - embedded_before <= bound
        embedded_before += batch


def test_augmented_views_differ_from_the_plain_view_and_follow_the_seed(
    photo_folder: Path,
) -> None:
    sources = ImageSources.from_folder(photo_folder)
    first = embed(sources, tiny_backbone(), augmented_views=2, seed=5, batch_size=2)
    again = embed(sources, tiny_backbone(), augmented_views=2, seed=5, batch_size=3)
    other = embed(sources, tiny_backbone(), augmented_views=2, seed=6, decode_workers=1)
    assert first.augmented is not None and first.augmented.shape == (2, len(first), 16)
    assert torch.equal(first.augmented, again.augmented)  # batching and threads do not matter
    assert not torch.equal(first.augmented, other.augmented)
    torch.testing.assert_close(first.features, other.features)  # the plain view has no seed
    for view in range(2):
        assert (first.augmented[view].float() - first.features.float()).abs().max() > 1e-2
    assert (first.augmented[0].float() - first.augmented[1].float()).abs().max() > 1e-2


def test_real_backbone_at_a_small_size(photo_folder: Path) -> None:
    import timm

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    sources = ImageSources.from_folder(photo_folder)
    embedded = embed(sources, module, input_size=64, runtime=resolve_runtime("cpu", "auto"))
    assert embedded.features.shape == (5, module.num_features)
    assert torch.isfinite(embedded.features.float()).all()


def test_progress_stop_and_bad_modules() -> None:
    images = np.full((5, 16, 16, 3), 100, dtype=np.uint8)
    sources = ImageSources.from_array(images)
    seen: list[tuple[int, int]] = []
    embed(sources, tiny_backbone(), input_size=16, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (5, 5) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    with pytest.raises(StopRequested):
        embed(sources, tiny_backbone(), input_size=16, should_stop=lambda: True)
    feature_map = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="pooled features"):
        embed(sources, feature_map, input_size=16)
    with pytest.raises(ValueError, match="interpolation"):
        embed(sources, tiny_backbone(), input_size=16, interpolation="cubic")


def test_empty_and_all_broken_collections_give_zero_rows(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nothing")
    embedded = embed(ImageSources.from_folder(tmp_path), tiny_backbone(), augmented_views=1)
    assert embedded.features.shape == (0, 16)
    assert embedded.augmented.shape == (1, 0, 16)
    assert [item.path for item in embedded.skipped] == ["broken.png"]


def test_zip_sources_stream_like_a_folder(photo_folder: Path, tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(photo_folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(photo_folder).as_posix())
    folder = embed(ImageSources.from_folder(photo_folder), tiny_backbone())
    with ImageSources.from_zip(path) as sources:
        zipped = embed(sources, tiny_backbone(), decode_workers=3)
    assert zipped.ids == folder.ids
    assert torch.equal(zipped.features, folder.features)
    assert len(io.BytesIO(path.read_bytes()).getvalue()) > 0
