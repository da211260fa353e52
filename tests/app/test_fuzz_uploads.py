"""Property-based tests (hypothesis) of the zip and image checks: whatever the bytes, an upload
is either refused with a 4xx UploadError or yields only safe, decodable images; an entry name
never leads outside the upload folder; an image file is either usable or refused with a reason.

Example counts are fixed and the generation is derandomized, so CI runs the same few hundred
cases every time in a few seconds.
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _image(fmt: str, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(len(fmt)).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


SAMPLES = {
    "png": _image("PNG"),
    "jpeg": _image("JPEG"),
    "gif": _image("GIF", mode="P"),
    "bmp": _image("BMP"),
    "webp": _image("WEBP"),
    "tiff": _image("TIFF"),
}


def _base_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cats/a.png", SAMPLES["png"], compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("cats/b.jpg", SAMPLES["jpeg"], compress_type=zipfile.ZIP_STORED)
        archive.writestr("dogs/c.gif", SAMPLES["gif"], compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("dogs/", b"")
        archive.writestr("notes.txt", b"hello " * 50, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


BASE_ZIP = _base_zip()


def _settings() -> object:
    from app.core.config import Settings

    return Settings(_env_file=None, DATA_DIR=Path(tempfile.gettempdir()))  # type: ignore[call-arg]


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    return bytes(mutated[:cut] if cut is not None else mutated)


def _check_extraction(payload: bytes) -> None:
    """Extract `payload` as the service does: an UploadError (4xx), or only safe images."""
    from app.uploads import UploadError
    from app.uploads.ingest import _extract, _inspect_image

    settings = _settings()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder) / "work"
        work.mkdir()
        (work / "upload.zip").write_bytes(payload)
        try:
            result = _extract(work / "upload.zip", work, settings)  # type: ignore[arg-type]
        except UploadError as error:
            assert 400 <= error.status_code < 500 and error.message
            return
        stored = sorted(p.name for p in (work / "images").iterdir())
        assert len(stored) == len(result.accepted)
        for accepted in result.accepted:
            path = work / "images" / f"{accepted.position:06d}{accepted.extension}"
            assert path.is_file() and path.stat().st_size == accepted.size_bytes
            assert _inspect_image(path, settings)[1:] == (accepted.width, accepted.height)  # type: ignore[arg-type]
            assert (work / "thumbs" / f"{accepted.position:06d}.jpg").is_file()
            assert not PurePosixPath(accepted.original_path).is_absolute()
            assert ".." not in PurePosixPath(accepted.original_path).parts
        assert all(entry["reason"] for entry in result.skipped)


@FUZZ
@given(st.text(max_size=120) | st.from_regex(r"[./\\A-Za-z:\x00-\x1f]{0,40}", fullmatch=True))
def test_entry_names_never_escape_the_folder(name: str) -> None:
    from scan_engine.archive import entry_path

    relative, problem = entry_path(name)
    if relative is None:
        assert problem is None or problem  # ignored silently, or skipped with a reason
        return
    assert problem is None
    parts = relative.split("/")
    assert "" not in parts and "." not in parts and ".." not in parts
    assert not relative.startswith("/") and "\\" not in relative
    assert not re.match(r"^[A-Za-z]:", relative) and not re.search(r"[\x00-\x1f\x7f]", relative)
    assert len(relative) <= 1024
    root = Path("/srv/uploads/work")
    assert root in (root / relative).resolve().parents


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, len(BASE_ZIP) - 1), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, len(BASE_ZIP)),
)
def test_damaged_zips_are_refused_or_yield_only_good_images(
    flips: list[tuple[int, int]], cut: int | None
) -> None:
    _check_extraction(_mutate(BASE_ZIP, flips, cut))


ENTRY = st.tuples(
    st.text(min_size=1, max_size=30) | st.sampled_from(["a.png", "../x.png", "C:/y.png", "a.png"]),
    st.sampled_from(sorted(SAMPLES)).map(SAMPLES.get) | st.binary(max_size=200),
)


@FUZZ
@given(entries=st.lists(ENTRY, max_size=6))
def test_generated_zips_are_refused_or_yield_only_good_images(
    entries: list[tuple[str, bytes]],
) -> None:
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names drawn
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, payload in entries:
                archive.writestr(name, payload or b"")
    _check_extraction(buffer.getvalue())


@FUZZ
@given(
    fmt=st.sampled_from(sorted(SAMPLES)),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 4000),
)
def test_damaged_images_are_usable_or_refused_with_a_reason(
    fmt: str, flips: list[tuple[int, int]], cut: int | None
) -> None:
    from app.uploads.ingest import _inspect_image
    from scan_engine.data import ImageDecodeError, decode_image

    settings = _settings()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image"
        path.write_bytes(_mutate(SAMPLES[fmt], flips, cut))
        try:
            _, width, height = _inspect_image(path, settings)  # type: ignore[arg-type]
            thumbnail = decode_image(path, 32)
        except ImageDecodeError as error:
            assert str(error)
            return
    assert width * height <= settings.MAX_IMAGE_PIXELS  # type: ignore[attr-defined]
    assert min(width, height) >= settings.MIN_IMAGE_SIDE  # type: ignore[attr-defined]
    assert thumbnail.shape == (32, 32, 3) and thumbnail.dtype == np.uint8


def test_the_base_zip_itself_is_accepted() -> None:
    """The fuzzing starts from a good upload: 3 images kept, the text file skipped."""
    from app.uploads.ingest import _extract

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "upload.zip").write_bytes(BASE_ZIP)
        result = _extract(work / "upload.zip", work, _settings())  # type: ignore[arg-type]
    assert [a.original_path for a in result.accepted] == ["cats/a.png", "cats/b.jpg", "dogs/c.gif"]
    assert result.skipped == [{"path": "notes.txt", "reason": result.skipped[0]["reason"]}]
