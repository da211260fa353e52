"""Fixtures every test folder may use: the real S3-compatible store (SeaweedFS), started once
per session the first time a test asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.seaweedfs import SeaweedFS


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running `weed mini` on loopback with one access key and an empty bucket."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_seaweedfs(tmp_path) -> Iterator[SeaweedFS]:  # noqa: ANN001
    """A store of this test's own, for tests that stop it (outages) or must see it empty."""
    server = SeaweedFS(tmp_path / "weed").start()
    try:
        yield server
    finally:
        server.stop()
