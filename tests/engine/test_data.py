"""Tests for scan_engine.data: real image files in every format and mode, folders, zips, arrays."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scan_engine.data import (
    SUPPORTED_FORMATS,
    ImageCollection,
    ImageDecodeError,
    SkippedFile,
    decode_image,
    from_arrays,
    load_collection,
    load_files,
    load_folder,
    load_npz,
    load_zip,
)
from scan_engine.sample_data import make_shapes_collection

SHARED_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
ORANGE = (200, 100, 50)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write(path: Path, image: Image.Image, fmt: str, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image, fmt, **options))
    return path


def assert_colour(pixels: np.ndarray, expected: tuple[int, int, int], tolerance: int) -> None:
    """Every pixel of (..., 3) `pixels` within `tolerance` of `expected` in every channel."""
    difference = np.abs(pixels.reshape(-1, 3).astype(int) - np.array(expected)).max()
    assert difference <= tolerance, f"max difference {difference} from {expected}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; Pillow reads the size before any pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# --- formats -------------------------------------------------------------------------------------

FORMATS = [
    ("a.jpg", "JPEG", {"quality": 95}, 8),
    ("b.png", "PNG", {}, 0),
    ("c.webp", "WEBP", {"quality": 95}, 10),
    ("d.bmp", "BMP", {}, 0),
    ("e.gif", "GIF", {}, 0),
    ("f.tiff", "TIFF", {}, 0),
]


@pytest.mark.parametrize(("name", "fmt", "options", "tolerance"), FORMATS)
def test_every_format_decodes_to_rgb(tmp_path, name, fmt, options, tolerance):
    path = write(tmp_path / name, Image.new("RGB", (40, 30), ORANGE), fmt, **options)
    from_path = decode_image(path, 16)
    from_bytes = decode_image(path.read_bytes(), 16)
    assert from_path.shape == (16, 16, 3) and from_path.dtype == np.uint8
    np.testing.assert_array_equal(from_path, from_bytes)
    assert_colour(from_path, ORANGE, tolerance)


def test_folder_loads_every_format_sorted(tmp_path):
    for name, fmt, options, _ in FORMATS:
        write(tmp_path / name, Image.new("RGB", (40, 30), ORANGE), fmt, **options)
    collection = load_folder(tmp_path, image_size=16)
    assert collection.ids == ["a.jpg", "b.png", "c.webp", "d.bmp", "e.gif", "f.tiff"]
    assert collection.paths == collection.ids
    assert collection.skipped == []
    assert collection.images.shape == (6, 3, 16, 16)
    assert collection.images.dtype == torch.uint8 and collection.images.is_contiguous()
    assert collection.labels is None and collection.class_names is None


def _two_colour_image() -> Image.Image:
    """60x40: orange left, blue right, a grey bar; enough structure for a lossy codec to show."""
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = ORANGE
    pixels[:, 30:] = (30, 60, 220)
    pixels[15:25] = (128, 128, 128)
    return Image.fromarray(pixels)


def _heic_bytes(image: Image.Image) -> bytes:
    import pillow_heif

    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, quality=90)  # libheif's own HEVC encoder
    return buffer.getvalue()


def _avif_bytes(image: Image.Image) -> bytes:
    return encode(image, "AVIF", quality=90)  # Pillow's own AVIF plugin


NEEDS_AVIF = pytest.mark.skipif(
    "AVIF" not in SUPPORTED_FORMATS, reason="this Pillow is built without AVIF"
)
PHONE_FORMATS = [
    pytest.param("photo.heic", _heic_bytes, b"ftypheic", id="heic"),
    pytest.param("photo.heif", _heic_bytes, b"ftypheic", id="heif"),
    pytest.param("photo.avif", _avif_bytes, b"ftypavif", id="avif", marks=NEEDS_AVIF),
]


@pytest.mark.parametrize(("name", "encoder", "brand"), PHONE_FORMATS)
def test_heic_and_avif_load_from_bytes_folders_and_zips(tmp_path, name, encoder, brand):
    image = _two_colour_image()
    payload = encoder(image)
    assert payload[4:12] == brand  # really that format, not a PNG under another name
    reference = decode_image(encode(image, "PNG"), 16).astype(int)
    decoded = decode_image(payload, 16)
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - reference).mean() < 4  # lossy, but the same picture

    (tmp_path / "folder" / "phone").mkdir(parents=True)
    (tmp_path / "folder" / "phone" / name).write_bytes(payload)
    from_folder = load_folder(tmp_path / "folder", image_size=16)
    zip_path = tmp_path / "phone.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr(f"phone/{name}", payload)
    from_zip = load_zip(zip_path, image_size=16)
    assert from_zip.paths == from_folder.paths == [f"phone/{name}"]
    assert from_zip.skipped == from_folder.skipped == []
    assert np.array_equal(from_zip.images[0].permute(1, 2, 0).numpy(), decoded)
    assert torch.equal(from_zip.images, from_folder.images)


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    assert_colour(decode_image(path, 16), (255, 0, 0), 0)


# --- EXIF orientation ---------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    # 60 wide x 40 high, blue, with a red 20x20 block in the top-left corner.
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated = write(tmp_path / "rotated.jpg", image, "JPEG", quality=95, exif=exif)
    plain = write(tmp_path / "plain.jpg", image, "JPEG", quality=95)

    # Unrotated: the centre 40x40 crop (x 10..50) has red in its top-left corner (cols 0..10).
    unrotated = decode_image(plain, 40)
    assert_colour(unrotated[2:8, 2:8], (255, 0, 0), 40)
    assert_colour(unrotated[2:8, 32:38], (0, 0, 255), 40)

    # Displayed upright the image is 40 wide x 60 high with red in the top-right corner; the
    # centre crop (rows 10..50) keeps red in rows 0..10, cols 20..40.
    upright = decode_image(rotated, 40)
    assert_colour(upright[2:8, 32:38], (255, 0, 0), 40)
    assert_colour(upright[2:8, 2:8], (0, 0, 255), 40)
    assert_colour(upright[30:38, 30:38], (0, 0, 255), 40)
    expected = np.asarray(image.transpose(Image.Transpose.ROTATE_270))[10:50]
    assert np.abs(upright.astype(int) - expected).mean() < 6


# --- colour modes -------------------------------------------------------------------------------


LOSSLESS = {"lossless": True}


def palette_image(index: int, transparent: int | None = None) -> Image.Image:
    image = Image.new("P", (20, 20), index)
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    if transparent is not None:
        image.info["transparency"] = transparent  # the PNG writer saves it as a tRNS chunk
    return image


@pytest.mark.parametrize(
    ("image", "fmt", "options", "expected"),
    [
        (Image.new("L", (20, 20), 77), "PNG", {}, (77, 77, 77)),
        (Image.new("1", (20, 20), 1), "PNG", {}, (255, 255, 255)),
        (palette_image(1), "PNG", {}, (0, 255, 0)),
        (palette_image(2), "GIF", {}, (0, 0, 255)),
        (palette_image(0, 0), "PNG", {}, (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG", {}, (255, 255, 255)),
        (Image.new("RGBA", (20, 20), (0, 0, 255, 255)), "PNG", {}, (0, 0, 255)),
        (Image.new("RGBA", (20, 20), (0, 0, 255, 128)), "WEBP", LOSSLESS, (127, 127, 255)),
        (Image.new("LA", (20, 20), (0, 0)), "PNG", {}, (255, 255, 255)),
        (Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", {"quality": 95}, (255, 0, 0)),
        (Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "TIFF", {}, (255, 0, 0)),
        (Image.new("CMYK", (20, 20), (0, 0, 0, 255)), "TIFF", {}, (0, 0, 0)),
    ],
    ids=["L", "1", "P", "P-gif", "P-transparent", "RGBA-clear", "RGBA", "RGBA-half", "LA",
         "CMYK-jpeg", "CMYK-tiff", "CMYK-black"],
)  # fmt: skip
def test_colour_modes_become_rgb(tmp_path, image, fmt, options, expected):
    path = write(tmp_path / f"image.{fmt.lower()}", image, fmt, **options)
    with Image.open(path) as reopened:
        assert reopened.mode == image.mode  # the file really holds that mode
    assert_colour(decode_image(path, 16), expected, 2)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, fmt):
    # Three bands of 16-bit values; clipping to 8 bits would make all of them 255.
    values = np.zeros((30, 30), dtype=np.uint16)
    values[:10], values[10:20], values[20:] = 25700, 40000, 65535
    path = write(tmp_path / f"deep.{fmt.lower()}", Image.fromarray(values), fmt)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I;16")
    decoded = decode_image(path, 30)
    assert_colour(decoded[:10], (100, 100, 100), 0)  # 25700 / 257
    assert_colour(decoded[10:20], (156, 156, 156), 0)  # 40000 / 257 = 155.6
    assert_colour(decoded[20:], (255, 255, 255), 0)


def test_32_bit_int_and_float_tiff(tmp_path):
    ints = np.full((20, 20), 25700, dtype=np.int32)
    int_path = write(tmp_path / "int.tiff", Image.fromarray(ints), "TIFF")
    assert Image.open(int_path).mode == "I"
    assert_colour(decode_image(int_path, 16), (100, 100, 100), 0)

    floats = np.zeros((20, 20), dtype=np.float32)
    floats[:, 10:] = 1.0
    float_path = write(tmp_path / "float.tiff", Image.fromarray(floats), "TIFF")
    assert Image.open(float_path).mode == "F"
    decoded = decode_image(float_path, 20)
    assert_colour(decoded[:, :8], (0, 0, 0), 0)
    assert_colour(decoded[:, 12:], (255, 255, 255), 0)


# --- resize and centre crop -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(90, 30), (30, 90)])
def test_shorter_side_resize_and_centre_crop(tmp_path, size):
    # Thirds along the long side: red | green | blue. The centre square is the green third.
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    third = max(size) // 3
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        if size[0] > size[1]:
            pixels[:, i * third : (i + 1) * third] = colour
        else:
            pixels[i * third : (i + 1) * third] = colour
    path = write(tmp_path / "wide.png", Image.fromarray(pixels), "PNG")
    decoded = decode_image(path, 12)
    assert decoded.shape == (12, 12, 3)
    assert_colour(decoded[1:-1, 1:-1], (0, 255, 0), 0)


def test_small_images_are_upscaled_and_large_jpegs_downscaled(tmp_path):
    small = write(tmp_path / "small.png", Image.new("RGB", (10, 12), ORANGE), "PNG")
    assert decode_image(small, 32).shape == (32, 32, 3)
    large = write(tmp_path / "large.jpg", Image.new("RGB", (1600, 1200), ORANGE), "JPEG")
    decoded = decode_image(large, 32)
    assert decoded.shape == (32, 32, 3)
    assert_colour(decoded, ORANGE, 8)


# --- files that are skipped ---------------------------------------------------------------------


def test_bad_files_raise_with_a_reason(tmp_path):
    good = encode(Image.new("RGB", (64, 64), ORANGE), "PNG")
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noisy), "JPEG")
    cases = {
        "text": (b"hello, I am not an image\n", "not an image"),
        "empty": (b"", "empty file"),
        "truncated png": (good[: len(good) // 2], "corrupt"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "garbage after signature": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "corrupt|not an image"),
        "too small": (encode(Image.new("RGB", (4, 4)), "PNG"), "too small"),
    }
    for name, (payload, reason) in cases.items():
        with pytest.raises(ImageDecodeError, match=reason) as info:
            decode_image(payload, 32)
        assert str(info.value), name
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image(tmp_path / "missing.png", 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 20_000])  # over the limit, and over twice the limit
def test_decompression_bombs_are_refused(side):
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_header_only(side, side), 32)


def test_folder_skips_bad_files_with_reasons(tmp_path):
    write(tmp_path / "cats" / "good.png", Image.new("RGB", (20, 20), ORANGE), "PNG")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    good_jpeg = encode(Image.new("RGB", (64, 64), ORANGE), "JPEG")
    (tmp_path / "cats" / "broken.jpg").write_bytes(good_jpeg[:40])
    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: ignored silently
    write(tmp_path / ".hidden" / "x.png", Image.new("RGB", (20, 20)), "PNG")

    collection = load_folder(tmp_path, image_size=8)
    assert collection.ids == ["cats/good.png"]
    assert [item.path for item in collection.skipped] == [
        "bomb.png",
        "cats/broken.jpg",
        "cats/notes.txt",
    ]
    reasons = {item.path: item.reason for item in collection.skipped}
    assert "decompression bomb" in reasons["bomb.png"]
    assert "corrupt" in reasons["cats/broken.jpg"]
    assert "not an image" in reasons["cats/notes.txt"]
    assert all(isinstance(item, SkippedFile) for item in collection.skipped)


def test_empty_folder_and_all_skipped_give_an_empty_collection(tmp_path):
    empty = load_folder(tmp_path, image_size=24)
    assert len(empty) == 0 and empty.images.shape == (0, 3, 24, 24)
    (tmp_path / "readme.txt").write_text("nothing here")
    only_bad = load_folder(tmp_path, image_size=24)
    assert len(only_bad) == 0 and len(only_bad.skipped) == 1


# --- zips and labels ---------------------------------------------------------------------------


def test_zip_equals_folder_and_skips_junk(tmp_path):
    root = make_shapes_collection(tmp_path / "shapes", classes=3, per_class=4, image_size=24)
    (root / "notes.txt").write_text("a note")
    (root / ".DS_Store").write_bytes(b"junk")
    good_png = (root / "red_circle" / "0000.png").read_bytes()

    zip_path = tmp_path / "shapes.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(root.rglob("*"), reverse=True):  # entry order must not matter
            archive.write(file, file.relative_to(root).as_posix())
        archive.writestr("__MACOSX/red_circle/._0000.png", b"resource fork")
        archive.writestr("red_circle/.hidden.png", good_png)
        archive.writestr(zipfile.ZipInfo("../evil.png"), good_png)
        archive.writestr(zipfile.ZipInfo("/absolute.png"), good_png)
        archive.writestr("empty_dir/", b"")

    from_folder = load_folder(root, image_size=24, labels_from_folders=True)
    from_zip = load_zip(zip_path, image_size=24, labels_from_folders=True)
    assert len(from_folder) == 12
    assert from_zip.ids == from_folder.ids
    assert from_zip.paths == from_folder.paths
    assert torch.equal(from_zip.images, from_folder.images)
    np.testing.assert_array_equal(from_zip.labels, from_folder.labels)
    assert (
        from_zip.class_names
        == from_folder.class_names
        == [
            "blue_triangle",
            "green_square",
            "red_circle",
        ]
    )
    assert [item.path for item in from_folder.skipped] == ["notes.txt"]
    zip_reasons = {item.path: item.reason for item in from_zip.skipped}
    assert set(zip_reasons) == {"../evil.png", "/absolute.png", "notes.txt"}
    assert "unsafe path" in zip_reasons["../evil.png"]
    assert "unsafe path" in zip_reasons["/absolute.png"]
    # Images at the top level (none here besides the skipped note) would disable folder labels.
    assert load_collection(zip_path, image_size=24).ids == from_folder.ids


def test_zip_with_corrupt_entry_and_not_a_zip(tmp_path):
    zip_path = tmp_path / "bad.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", encode(Image.new("RGB", (20, 20), ORANGE), "PNG"))
        archive.writestr("b.png", encode(Image.new("RGB", (20, 20), ORANGE), "PNG"))
    data = bytearray(zip_path.read_bytes())
    offset = data.index(b"IDAT", data.index(b"b.png"))
    data[offset + 8] ^= 0xFF  # flip a byte inside the stored b.png: its CRC no longer matches
    zip_path.write_bytes(bytes(data))
    collection = load_zip(zip_path, image_size=16)
    assert collection.ids == ["a.png"]
    assert collection.skipped[0].path == "b.png" and "CRC" in collection.skipped[0].reason

    not_zip = tmp_path / "not.zip"
    not_zip.write_text("plain text")
    with pytest.raises(zipfile.BadZipFile):
        load_zip(not_zip)


def test_labels_from_folders(tmp_path):
    image = Image.new("RGB", (16, 16), ORANGE)
    for relative in ["dogs/1.png", "cats/2.png", "cats/deeper/3.png"]:
        write(tmp_path / "flat" / relative, image, "PNG")
    flat = load_folder(tmp_path / "flat", image_size=8, labels_from_folders=True)
    assert flat.ids == ["cats/2.png", "cats/deeper/3.png", "dogs/1.png"]
    assert flat.class_names == ["cats", "dogs"]
    np.testing.assert_array_equal(flat.labels, [0, 0, 1])
    assert flat.labels.dtype == np.int64

    # One wrapping folder (as zipping a folder produces) is looked through.
    for relative in ["photos/dogs/1.png", "photos/cats/2.png"]:
        write(tmp_path / "wrapped" / relative, image, "PNG")
    wrapped = load_folder(tmp_path / "wrapped", image_size=8, labels_from_folders=True)
    assert wrapped.class_names == ["cats", "dogs"]
    np.testing.assert_array_equal(wrapped.labels, [0, 1])

    # An image at the top level: no labels for anyone.
    write(tmp_path / "flat" / "loose.png", image, "PNG")
    mixed = load_folder(tmp_path / "flat", image_size=8, labels_from_folders=True)
    assert mixed.labels is None and mixed.class_names is None
    assert load_folder(tmp_path / "flat", image_size=8).labels is None


def test_load_files_keeps_given_ids_order_and_labels(tmp_path):
    red = write(tmp_path / "r.png", Image.new("RGB", (20, 20), (255, 0, 0)), "PNG")
    blue = write(tmp_path / "b.png", Image.new("RGB", (20, 20), (0, 0, 255)), "PNG")
    text = tmp_path / "t.png"
    text.write_text("not really a png")
    collection = load_files(
        [("img-9", blue), ("img-1", text), ("img-2", red)],
        image_size=8,
        labels=[1, 2, 0],
        class_names=["red", "blue", "other"],
    )
    assert collection.ids == ["img-9", "img-2"]
    assert collection.paths == [str(blue), str(red)]
    np.testing.assert_array_equal(collection.labels, [1, 0])
    assert collection.class_names == ["red", "blue", "other"]
    assert collection.images[0, 2].min() == 255 and collection.images[1, 0].min() == 255
    assert collection.skipped == [SkippedFile(str(text), collection.skipped[0].reason)]
    with pytest.raises(ValueError, match="unique"):
        load_files([("same", red), ("same", blue)])


# --- arrays, npz, subset ----------------------------------------------------------------------


def make_npz(path: Path, classes: int = 3, per_class: int = 10, side: int = 8) -> np.ndarray:
    """A class-major benchmark-style file; pixel value = row number, so rows can be recognised."""
    n = classes * per_class
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, side, side, 3))
    np.savez(
        path,
        images=np.ascontiguousarray(images),
        labels=np.repeat(np.arange(classes, dtype=np.int64), per_class),
        class_names=np.array([f"class{c}" for c in range(classes)]),
        paths=np.array([f"test/class{i // per_class}/{i:04d}.jpg" for i in range(n)]),
    )
    return images


def test_from_arrays():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 10, 10, 3), dtype=np.uint8)
    collection = from_arrays(images, labels=[0, 1, 0, 1, 1], class_names=["a", "b"])
    assert collection.ids == ["000000", "000001", "000002", "000003", "000004"]
    assert collection.paths == collection.ids
    np.testing.assert_array_equal(collection.images.numpy(), images.transpose(0, 3, 1, 2))
    assert collection.labels.dtype == np.int64
    images[0] = 0  # the collection holds its own copy
    assert collection.images[0].any()

    resized = from_arrays(images, image_size=20)
    assert resized.images.shape == (5, 3, 20, 20)
    wide = rng.integers(0, 256, (2, 10, 20, 3), dtype=np.uint8)
    cropped = from_arrays(wide, ids=["x", "y"])
    np.testing.assert_array_equal(cropped.images.numpy(), wide[:, :, 5:15].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError):
        from_arrays(images.astype(np.float32))
    with pytest.raises(ValueError):
        from_arrays(images, labels=[0, 1])
    with pytest.raises(ValueError, match="unique"):
        from_arrays(images[:2], ids=["a", "a"])


def test_load_npz_and_seeded_limit(tmp_path):
    path = tmp_path / "bench.npz"
    make_npz(path)
    full = load_npz(path)
    assert len(full) == 30 and full.class_names == ["class0", "class1", "class2"]
    assert full.paths[12] == "test/class1/0012.jpg" and full.ids[12] == "000012"

    subset = load_npz(path, limit=9, seed=0)
    rows = [int(i) for i in subset.ids]
    assert len(subset) == 9 and rows == sorted(rows)
    assert rows != list(range(9))  # not the first (all class0) rows
    assert len(set(subset.labels.tolist())) > 1
    np.testing.assert_array_equal(subset.images[:, 0, 0, 0].numpy(), rows)  # pixel = row
    np.testing.assert_array_equal(subset.labels, np.array(rows) // 10)
    assert subset.paths == [full.paths[r] for r in rows]
    assert load_npz(path, limit=9, seed=0).ids == subset.ids
    assert load_npz(path, limit=9, seed=1).ids != subset.ids
    assert len(load_npz(path, limit=100)) == 30
    assert load_npz(path, limit=4, image_size=16).images.shape == (4, 3, 16, 16)
    assert load_collection(path, image_size=8).ids == full.ids


def test_subset_and_validation():
    images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    collection = from_arrays(images, labels=[0, 1, 2, 0, 1, 2], class_names=["a", "b", "c"])
    picked = collection.subset([4, 1])
    assert picked.ids == ["000004", "000001"]
    np.testing.assert_array_equal(picked.labels, [1, 1])
    assert torch.equal(picked.images, collection.images[[4, 1]])
    picked.images.zero_()  # a copy, not a view of the parent
    assert collection.images[4].any()

    mask = np.array([True, False, False, True, False, False])
    assert collection.subset(mask).ids == ["000000", "000003"]
    assert collection.subset(torch.tensor([5])).ids == ["000005"]
    assert len(collection.subset([])) == 0
    with pytest.raises(IndexError):
        collection.subset([6])
    with pytest.raises(ValueError):
        ImageCollection(torch.zeros((2, 3, 4, 4), dtype=torch.uint8), ["a", "a"], ["a", "b"])
    with pytest.raises(ValueError):
        ImageCollection(torch.zeros((1, 3, 4, 4)), ["a"], ["a"])  # float, not uint8


def test_load_collection_rejects_other_files(tmp_path):
    other = tmp_path / "file.txt"
    other.write_text("x")
    with pytest.raises(ValueError):
        load_collection(other)
    with pytest.raises(FileNotFoundError):
        load_collection(tmp_path / "missing")


@pytest.mark.shared_data
def test_real_cifar_subset():
    path = SHARED_DATASETS / "cifar10_test.npz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    collection = load_npz(path, limit=500, seed=0)
    assert collection.images.shape == (500, 3, 32, 32)
    assert "airplane" in collection.class_names
    assert len(set(collection.labels.tolist())) == 10
    assert all(p.endswith(".jpg") for p in collection.paths)
