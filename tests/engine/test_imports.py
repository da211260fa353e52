"""The engine stays free of the web, database and queue stacks (workers and the CLI import it)."""

from __future__ import annotations

import json
import subprocess
import sys

SERVICE_MODULES = ("fastapi", "sqlalchemy", "celery", "redis", "starlette")

_PROBE = """
import json, sys
{imports}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {names!r})))
"""


def _service_modules_after(imports: str) -> list[str]:
    """Run `imports` in a fresh interpreter; the service modules it left in sys.modules."""
    code = _PROBE.format(imports=imports, names=set(SERVICE_MODULES))
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_engine_imports_no_service_stack() -> None:
    loaded = _service_modules_after(
        "import scan_engine.pipeline, scan_engine.cli.cluster, scan_engine.cli.bench"
    )
    assert loaded == [], f"engine import pulled in {loaded}"


def test_probe_notices_a_service_module() -> None:
    # The check above is only worth something if the probe would see such a module.
    assert "starlette" in _service_modules_after("import starlette")
