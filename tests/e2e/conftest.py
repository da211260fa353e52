"""Fixtures for the end-to-end service tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_zip_e2e(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """210 small images in 3 class folders (png and jpg), as a user would upload them."""
    from scan_engine.sample_data import make_shapes_zip

    return make_shapes_zip(
        tmp_path_factory.mktemp("e2e") / "shapes.zip", classes=3, per_class=70, image_size=32
    )
