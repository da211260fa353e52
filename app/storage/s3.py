"""The object store on S3-compatible storage (AWS S3, SeaweedFS, MinIO...) through boto3.

Key `a/b.png` is the object `<S3_PREFIX>a/b.png` in the bucket. The boto3 client is created on
first use and again in a forked child (Celery's prefork pool, data-loading workers): a client
holds open connections that must not be shared across a fork. Big objects go up as a multipart
upload that is completed only after its last part, and aborted on any error, so nothing half
written is ever visible under the key.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, BinaryIO

from app.storage.objects import (
    TRANSFER_THREADS,
    ObjectInfo,
    ObjectStore,
    StorageKeyMissing,
    StorageUnavailable,
    check_key,
    check_prefix,
)

__all__ = ["S3ObjectStore", "MIN_PART_BYTES"]

logger = logging.getLogger(__name__)

# S3 refuses parts below 5 MiB (all but the last one).
MIN_PART_BYTES = 5 * 1024 * 1024
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3ObjectStore(ObjectStore):
    """Objects in one bucket, under an optional key prefix."""

    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        prefix: str = "",
        public_endpoint_url: str | None = None,
        part_bytes: int = 16 * 1024 * 1024,
        timeout_s: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ValueError("S3 storage needs a bucket")
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"multipart parts must be at least {MIN_PART_BYTES} bytes")
        if prefix:
            check_prefix(prefix, folder=True)
        self.bucket = bucket
        self.prefix = prefix
        self.part_bytes = part_bytes
        self._options = {
            "endpoint_url": endpoint_url or None,
            "region_name": region or None,
            "aws_access_key_id": access_key_id or None,
            "aws_secret_access_key": secret_access_key or None,
        }
        self._public_endpoint_url = public_endpoint_url or None
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._pid = os.getpid()

    # -- the client ---------------------------------------------------------------------------

    def _client(self, purpose: str = "data", timeout_s: float | None = None) -> Any:
        """The process's boto3 client ("data"), the one that signs browser URLs ("public", for
        a different public endpoint) or a quick one for readiness ("ready": `timeout_s`, no
        retries); made lazily, and anew after a fork."""
        if self._pid != os.getpid():
            # A forked child: the parent's clients (and a lock some thread may hold) stay behind.
            self._lock = threading.Lock()
            self._clients = {}
            self._pid = os.getpid()
        name = f"{purpose}:{timeout_s}"
        client = self._clients.get(name)
        if client is None:
            with self._lock:
                client = self._clients.get(name)
                if client is None:
                    client = self._make_client(purpose, timeout_s)
                    self._clients[name] = client
        return client

    def _make_client(self, purpose: str, timeout_s: float | None) -> Any:
        import boto3
        from botocore.config import Config

        options = dict(self._options)
        if purpose == "public" and self._public_endpoint_url:
            options["endpoint_url"] = self._public_endpoint_url
        config = Config(
            connect_timeout=timeout_s or self._timeout_s,
            read_timeout=timeout_s or self._timeout_s,
            retries={"max_attempts": 1 if timeout_s else self._max_attempts, "mode": "standard"},
            signature_version="s3v4",
            # One connection per thread of a folder transfer (the default pool holds 10).
            max_pool_connections=TRANSFER_THREADS + 4,
            # A custom endpoint (SeaweedFS, MinIO) rarely has wildcard DNS for bucket hosts.
            s3={"addressing_style": "path" if options["endpoint_url"] else "auto"},
        )
        # A session per client: boto3 sessions are not thread-safe, clients are.
        return boto3.session.Session().client("s3", config=config, **options)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _error(self, error: Exception, key: str | None = None) -> Exception:
        """StorageKeyMissing for a missing object, StorageUnavailable for everything else
        botocore raises: unreachable endpoint, timeouts, throttling, refused credentials."""
        from botocore.exceptions import ClientError

        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if key is not None and code in _MISSING_CODES:
                return StorageKeyMissing(key)
            return StorageUnavailable(f"S3 bucket {self.bucket!r} refused the request: {code}")
        return StorageUnavailable(f"S3 at {self._options['endpoint_url'] or 'AWS'}: {error}")

    @contextmanager
    def _calling(self, key: str | None = None) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            raise self._error(error, key) from error

    # -- writes -------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        name = self._name(key)
        extra = {"ContentType": content_type} if content_type else {}
        with self._calling(key):
            self._client().put_object(Bucket=self.bucket, Key=name, Body=data, **extra)

    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> int:
        name = self._name(key)
        first = _read_full(stream, self.part_bytes)
        if len(first) < self.part_bytes:  # fits in one part: one plain PUT
            self.put_bytes(key, first, content_type)
            return len(first)
        extra = {"ContentType": content_type} if content_type else {}
        client = self._client()
        with self._calling(key):
            upload_id = client.create_multipart_upload(Bucket=self.bucket, Key=name, **extra)[
                "UploadId"
            ]
        parts: list[dict[str, Any]] = []
        total = 0
        try:
            chunk = first
            while chunk:
                with self._calling(key):
                    answer = client.upload_part(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload_id,
                        PartNumber=len(parts) + 1,
                        Body=chunk,
                    )
                parts.append({"PartNumber": len(parts) + 1, "ETag": answer["ETag"]})
                total += len(chunk)
                chunk = _read_full(stream, self.part_bytes)  # (part_bytes,) held at a time
            with self._calling(key):
                client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self._abort(name, upload_id)
            raise
        return total

    def _abort(self, name: str, upload_id: str) -> None:
        """Drop an unfinished upload's parts; the store may be down, so failure only logs."""
        try:
            self._client().abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except Exception:
            logger.warning("could not abort the multipart upload of %s", name, exc_info=True)

    # -- reads --------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        with self._calling(key):
            answer = self._client().get_object(Bucket=self.bucket, Key=self._name(key))
            return bytes(answer["Body"].read())

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        if length == 0:
            self.size(key)  # still a clear error for a missing key
            return b""
        from botocore.exceptions import ClientError

        try:
            answer = self._client().get_object(
                Bucket=self.bucket, Key=self._name(key), Range=f"bytes={start}-{start + length - 1}"
            )
            return bytes(answer["Body"].read())
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # starts at or past the end, as a file read there would
            raise self._error(error, key) from error
        except Exception as error:
            raise self._error(error, key) from error

    def open_read(self, key: str) -> AbstractContextManager[BinaryIO]:
        with self._calling(key):
            answer = self._client().get_object(Bucket=self.bucket, Key=self._name(key))
        return _closing_body(answer["Body"])

    def size(self, key: str) -> int:
        with self._calling(key):
            answer = self._client().head_object(Bucket=self.bucket, Key=self._name(key))
        return int(answer["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        paginator = self._client().get_paginator("list_objects_v2")
        with self._calling():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    modified = item.get("LastModified")
                    yield ObjectInfo(
                        key, int(item["Size"]), modified.timestamp() if modified else None
                    )

    # -- deletes ------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with self._calling():
            self._client().delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix, folder=True)
        keys = [info.key for info in self.list(prefix)]
        client = self._client()
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with self._calling():
                answer = client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self.prefix + k} for k in batch], "Quiet": True},
                )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageUnavailable(
                    f"S3 kept {len(answer['Errors'])} objects under {prefix!r}: {first.get('Code')}"
                )
        return len(keys)

    # -- browsers and readiness ---------------------------------------------------------------

    def presigned_get_url(
        self, key: str, expires_s: int, filename: str | None = None
    ) -> str | None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._name(key)}
        if filename:
            safe = filename.replace('"', "").replace("\\", "")
            params["ResponseContentDisposition"] = f'inline; filename="{safe}"'
        with self._calling(key):  # signing is local: no request is sent
            url: str = self._client("public").generate_presigned_url(
                "get_object", Params=params, ExpiresIn=int(expires_s)
            )
        return url

    def create_bucket(self) -> bool:
        """Create the bucket unless it exists; whether it was created."""
        from botocore.exceptions import ClientError

        client = self._client()
        try:
            client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) not in _MISSING_CODES | {
                "NoSuchBucket"
            }:
                raise self._error(error) from error
        except Exception as error:
            raise self._error(error) from error
        with self._calling():
            try:
                client.create_bucket(Bucket=self.bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                return False  # made meanwhile by another replica
        return True

    def check(self, timeout_s: float) -> None:
        with self._calling():
            self._client("ready", timeout_s).head_bucket(Bucket=self.bucket)


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Exactly `size` bytes, or fewer only at the end of the stream (reads may return less)."""
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


@contextmanager
def _closing_body(body: Any) -> Iterator[BinaryIO]:
    try:
        yield body
    except Exception as error:
        from botocore.exceptions import BotoCoreError

        if isinstance(error, BotoCoreError):
            raise StorageUnavailable(f"reading from S3 failed: {error}") from error
        raise
    finally:
        body.close()
