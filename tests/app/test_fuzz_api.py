"""Generated requests (schemathesis) against the service's own OpenAPI schema: no input gives a
500. The service runs as a real uvicorn process (embedded mode, its own data folder), holding
one dataset so that some generated requests reach real rows; example counts are fixed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.e2e.browser import run_server
from tests.service_support import png_bytes, zip_bytes

EXAMPLES = 8


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz-api")
    env = {
        "DATA_DIR": str(root / "data"),
        "LOG_FORMAT": "text",
        # A generated job that happens to be valid must not keep the CPU busy.
        "MAX_CONCURRENT_JOBS_PER_OWNER": "1",
        "MAX_UPLOAD_BYTES": "1000000",
    }
    with run_server(env, root / "server.log") as url:
        dataset = httpx.post(
            f"{url}/api/v1/datasets",
            files={"file": ("seed.zip", zip_bytes({"a.png": png_bytes(), "b.png": png_bytes()}))},
            timeout=30,
        )
        assert dataset.status_code == 201, dataset.text
        yield url
    log = (root / "server.log").read_text()
    assert "Traceback" not in log, log[-4000:]  # nothing blew up inside, even if answered


def _spec() -> dict[str, Any]:
    # The schema the service publishes (built, not served: pytest parametrizes at collection).
    # schemathesis's fixture-based lazy loading does not run on pytest 9.
    from app.main import create_app

    return create_app().openapi()


schema = schemathesis.openapi.from_dict(_spec())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gives_a_server_error(case: Any, live_api: str) -> None:
    response = case.call(base_url=live_api, timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )


def test_the_fuzzed_schema_is_the_served_one(live_api: str) -> None:
    served = httpx.get(f"{live_api}/openapi.json").json()
    assert served == _spec()
    assert (
        "/api/v1/datasets" in served["paths"] and "/api/v1/jobs/{job_id}/cancel" in served["paths"]
    )
