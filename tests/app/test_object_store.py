"""The object store contract, run over both backends: local files under DATA_DIR and S3 on a
real SeaweedFS server (tests/seaweedfs.py). Each S3 test works under its own key prefix.

put, get, ranged get, streamed read, list by prefix, delete (one key, a folder), multipart
uploads, presigned URLs (fetched with httpx; expired or tampered ones refused), a missing key
(StorageKeyMissing), keys that try to leave the store, and a store that cannot be reached
(StorageUnavailable).
"""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.seaweedfs import SeaweedFS
from tests.service_support import free_port, use_settings

PART = 5 * 1024 * 1024  # the smallest part S3 accepts: small multipart tests


def _payload(size: int, seed: int = 0) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[seed : seed + size]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_env(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> dict[str, str]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {"DATA_DIR": str(data_dir), "S3_MULTIPART_PART_BYTES": str(PART)}
    if backend == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        env |= server.settings_env() | {"S3_PREFIX": f"t-{uuid.uuid4().hex[:12]}/"}
    use_settings(monkeypatch, **env)
    return env


@pytest.fixture
def store(store_env: dict[str, str]) -> Any:
    from app.core.config import get_settings
    from app.storage import object_store

    return object_store(get_settings())


def test_the_factory_picks_the_backend_and_keeps_one_store_per_process(
    store: Any, backend: str
) -> None:
    from app.core.config import get_settings
    from app.storage import FilesystemObjectStore, S3ObjectStore, object_store

    assert store.kind == backend
    assert isinstance(store, FilesystemObjectStore if backend == "local" else S3ObjectStore)
    get_settings.cache_clear()
    assert object_store(get_settings()) is store


def test_put_get_size_exists_and_overwrite(store: Any) -> None:
    store.put_bytes("datasets/d1/images/0.png", b"first", content_type="image/png")
    assert store.get_bytes("datasets/d1/images/0.png") == b"first"
    assert store.size("datasets/d1/images/0.png") == 5
    assert store.exists("datasets/d1/images/0.png")
    assert not store.exists("datasets/d1/images/1.png")
    store.put_bytes("datasets/d1/images/0.png", b"second version")
    assert store.get_bytes("datasets/d1/images/0.png") == b"second version"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.size("empty") == 0


def test_local_keys_are_the_data_folder_layout(tmp_path: Path) -> None:
    """The embedded default reads the files rows already name, relative to DATA_DIR."""
    from app.storage import FilesystemObjectStore, Storage

    store = FilesystemObjectStore(tmp_path)
    store.put_bytes("datasets/d1/thumbs/0.jpg", b"jpeg")
    assert Storage(tmp_path).abspath("datasets/d1/thumbs/0.jpg").read_bytes() == b"jpeg"
    assert list((tmp_path / "tmp").iterdir()) == []  # the temp file became the object


def test_ranged_get(store: Any) -> None:
    data = _payload(1000)
    store.put_bytes("blob", data)
    assert store.get_range("blob", 0, 10) == data[:10]
    assert store.get_range("blob", 500, 250) == data[500:750]
    assert store.get_range("blob", 990, 100) == data[990:]  # short at the end
    assert store.get_range("blob", 1000, 10) == b""
    assert store.get_range("blob", 5000, 10) == b""
    assert store.get_range("blob", 3, 0) == b""
    with pytest.raises(ValueError):
        store.get_range("blob", -1, 10)


def test_streamed_read_and_copy_to_a_file(store: Any, tmp_path: Path) -> None:
    data = _payload(300_000, seed=7)
    store.put_bytes("jobs/j1/features.npy", data)
    chunks = []
    with store.open_read("jobs/j1/features.npy") as stream:
        while chunk := stream.read(65536):
            chunks.append(chunk)
    assert len(chunks) > 1 and b"".join(chunks) == data
    target = tmp_path / "scratch" / "features.npy"
    assert store.get_file("jobs/j1/features.npy", target) == len(data)
    assert target.read_bytes() == data


def test_list_by_prefix(store: Any) -> None:
    for key, size in {"a/1": 1, "a/2/x": 2, "ab/3": 3, "b/4": 4}.items():
        store.put_bytes(key, b"x" * size)
    assert [(i.key, i.size) for i in store.list("a/")] == [("a/1", 1), ("a/2/x", 2)]
    assert [i.key for i in store.list("a")] == ["a/1", "a/2/x", "ab/3"]  # a string prefix
    assert [i.key for i in store.list("a/2/")] == ["a/2/x"]
    assert list(store.list("c/")) == []
    everything = [i.key for i in store.list()]
    assert everything == sorted(everything)
    assert {"a/1", "a/2/x", "ab/3", "b/4"} <= set(everything)
    for info in store.list("a/"):  # when it was written, as the store's clock has it
        assert info.modified is not None and abs(info.modified - time.time()) < 120


def test_delete_one_key_and_a_folder(store: Any) -> None:
    for key in ("jobs/1/model.pt", "jobs/1/work/a", "jobs/10/model.pt", "jobs/2/model.pt"):
        store.put_bytes(key, b"m")
    store.delete("jobs/2/model.pt")
    assert not store.exists("jobs/2/model.pt")
    store.delete("jobs/2/model.pt")  # gone already: fine
    assert store.delete_prefix("jobs/1/") == 2
    assert [i.key for i in store.list("jobs/")] == ["jobs/10/model.pt"]  # jobs/10 kept
    assert store.delete_prefix("jobs/404/") == 0
    for unsafe in ("jobs/10", "", "../"):
        with pytest.raises(ValueError):
            store.delete_prefix(unsafe)
    assert store.exists("jobs/10/model.pt")


def test_multipart_upload_of_a_file_over_the_part_size(
    store: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = os.urandom(2 * PART + 12345)  # three parts, the last one short
    source = tmp_path / "upload.zip"
    source.write_bytes(data)
    assert store.put_file("uploads/u1.zip", source, content_type="application/zip") == len(data)
    assert store.size("uploads/u1.zip") == len(data)
    assert store.get_bytes("uploads/u1.zip") == data
    assert store.get_range("uploads/u1.zip", PART - 5, 10) == data[PART - 5 : PART + 5]
    if store.kind == "s3":
        raw = request.getfixturevalue("seaweedfs").client()
        head = raw.head_object(Bucket=store.bucket, Key=store.prefix + "uploads/u1.zip")
        assert head["ETag"].strip('"').endswith("-3")  # stored as a 3-part multipart upload


class _FailingStream(io.RawIOBase):
    """Yields `good` bytes, then breaks, as a client that disconnects mid-upload."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("the client went away")
        chunk = min(self.left, size if size > 0 else self.left)
        self.left -= chunk
        return b"z" * chunk


def test_a_broken_upload_leaves_nothing_half_written(
    store: Any, store_env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    store.put_bytes("uploads/u2.zip", b"the old object")
    with pytest.raises(ConnectionResetError):
        store.put_stream("uploads/u2.zip", _FailingStream(PART + 100))  # after one whole part
    assert store.get_bytes("uploads/u2.zip") == b"the old object"
    with pytest.raises(ConnectionResetError):
        store.put_stream("uploads/u3.zip", _FailingStream(100))
    assert not store.exists("uploads/u3.zip")
    if store.kind == "s3":
        raw = request.getfixturevalue("seaweedfs").client()
        pending = raw.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
        assert pending.get("Uploads", []) == []  # the parts were aborted
    else:
        assert not list((Path(store_env["DATA_DIR"]) / "tmp").iterdir())


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_folder_goes_up_whole_and_comes_back(
    store: Any, store_env: dict[str, str], tmp_path: Path
) -> None:
    files = {f"images/{i:06d}.png": _payload(300 + i, seed=i) for i in range(20)}
    files["thumbs/000000.jpg"] = b"thumb"
    # Under DATA_DIR/tmp, as an upload's folder is: the local store renames it into place.
    folder = _folder(Path(store_env["DATA_DIR"]) / "tmp" / "upload-1" / "dataset", files)
    assert store.put_folder(folder, "datasets/d9/") == 21
    stored = {info.key: info.size for info in store.list("datasets/d9/")}
    assert stored == {f"datasets/d9/{name}": len(data) for name, data in files.items()}
    back = tmp_path / "back"
    store.get_files([(f"datasets/d9/{name}", back / name) for name in files])
    assert {name: (back / name).read_bytes() for name in files} == files


def test_a_folder_upload_that_fails_leaves_no_object(store: Any, tmp_path: Path) -> None:
    from app.storage import StoragePathError

    folder = _folder(tmp_path / "upload", {f"images/{i}.png": b"x" * 10 for i in range(30)})
    (folder / "images" / "15.png").rename(folder / "images" / "back\\slash.png")  # no key
    with pytest.raises(StoragePathError):
        store.put_folder(folder, "datasets/d10/", threads=4)
    assert list(store.list("datasets/d10/")) == []


def test_presigned_urls(store: Any) -> None:
    data = _payload(2048, seed=3)
    store.put_bytes("datasets/d1/images/7.png", data, content_type="image/png")
    url = store.presigned_get_url("datasets/d1/images/7.png", 60, filename='cat "7".png')
    if store.kind == "local":
        assert url is None  # the API serves local files itself
        return
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200 and answer.content == data
    assert answer.headers["content-type"] == "image/png"
    assert 'filename="cat 7.png"' in answer.headers["content-disposition"]

    other = url.replace("images/7.png", "images/8.png")  # the signature covers the key
    assert httpx.get(other, timeout=10).status_code == 403
    signature = url.rsplit("X-Amz-Signature=", 1)[1][:64]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert httpx.get(url.replace(signature, flipped), timeout=10).status_code == 403

    short = store.presigned_get_url("datasets/d1/images/7.png", 1)
    assert httpx.get(short, timeout=10).status_code == 200
    time.sleep(2.2)
    expired = httpx.get(short, timeout=10)
    assert expired.status_code == 403 and b"expired" in expired.content.lower()


def test_a_missing_key_is_a_clear_error(store: Any) -> None:
    from app.storage import StorageKeyMissing

    readers = (
        lambda: store.get_bytes("nope/none.png"),
        lambda: store.get_range("nope/none.png", 0, 10),
        lambda: store.open_read("nope/none.png").__enter__(),
        lambda: store.size("nope/none.png"),
    )
    for read in readers:
        with pytest.raises(StorageKeyMissing, match="nope/none.png") as caught:
            read()
        assert caught.value.key == "nope/none.png"
    assert not store.exists("nope/none.png")
    store.put_bytes("nope/folder/x", b"1")
    with pytest.raises(StorageKeyMissing):
        store.get_bytes("nope/folder")  # a folder is not an object


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../b", "/etc/passwd", "a//b", "a/./b", "a\\b", "", "a/\x00", "a/"]
)
def test_keys_that_leave_the_store_are_refused(store: Any, key: str) -> None:
    from app.storage import StoragePathError

    with pytest.raises(StoragePathError):
        store.put_bytes(key, b"x")
    with pytest.raises(StoragePathError):
        store.get_bytes(key)
    with pytest.raises(StoragePathError):
        store.delete(key)
    with pytest.raises(StoragePathError):
        store.presigned_get_url(key, 60)


@pytest.fixture
def unreachable_store(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """local: DATA_DIR names a path inside a regular file (an unmounted or broken disk);
    s3: an endpoint where nothing listens."""
    from app.core.config import get_settings
    from app.storage import make_object_store

    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    env = {"DATA_DIR": str(blocker / "data")}
    if backend == "s3":
        env |= {
            "STORAGE_BACKEND": "s3",
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "S3_BUCKET": "scan-test",
            "S3_ACCESS_KEY_ID": "key",
            "S3_SECRET_ACCESS_KEY": "secret",
            "S3_TIMEOUT_S": "2",
            "S3_MAX_ATTEMPTS": "1",
        }
    use_settings(monkeypatch, **env)
    return make_object_store(get_settings())


def test_an_unreachable_store_is_storage_unavailable(unreachable_store: Any) -> None:
    from app.storage import StorageUnavailable

    store = unreachable_store
    calls = (
        lambda: store.put_bytes("a/b", b"x"),
        lambda: store.put_stream("a/b", io.BytesIO(b"x" * 100)),
        lambda: store.get_bytes("a/b"),
        lambda: store.get_range("a/b", 0, 1),
        lambda: store.size("a/b"),
        lambda: list(store.list("a/")),
        lambda: store.delete_prefix("a/"),
        lambda: store.check(1.0),
    )
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            call()
        assert time.monotonic() - started < 10


def test_wrong_s3_credentials_are_storage_unavailable(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from app.core.config import get_settings
    from app.storage import StorageUnavailable, make_object_store

    env = seaweedfs.settings_env() | {"DATA_DIR": str(tmp_path), "S3_SECRET_ACCESS_KEY": "wrong"}
    use_settings(monkeypatch, **env)
    store = make_object_store(get_settings())
    with pytest.raises(StorageUnavailable, match="SignatureDoesNotMatch"):
        store.get_bytes("a/b")
    with pytest.raises(StorageUnavailable):
        store.check(2.0)


def test_a_forked_child_makes_its_own_s3_client(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """The client is per process: a child of a fork (Celery prefork, data loaders) must not use
    the connections it inherited."""
    from app.storage import S3ObjectStore

    store = S3ObjectStore(
        bucket=seaweedfs.bucket,
        endpoint_url=seaweedfs.endpoint_url,
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=seaweedfs.secret_access_key,
        region="us-east-1",
        prefix=f"fork-{uuid.uuid4().hex[:8]}/",
    )
    store.put_bytes("parent", b"p")
    parent_client = store._client()
    assert store._client() is parent_client  # one client, made once
    child = os.fork()
    if child == 0:  # the child: exit status 0 only if it made and used a client of its own
        try:
            fresh = store._client() is not parent_client
            store.put_bytes("child", b"c")
            os._exit(0 if fresh and store.get_bytes("parent") == b"p" else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._client() is parent_client
    assert store.get_bytes("child") == b"c"
