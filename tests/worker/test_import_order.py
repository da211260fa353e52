"""No import cycle between app.runner and worker/, and the API side never imports worker/.

Each case runs in a fresh interpreter: a cycle shows only when its first module is imported
first (a partially initialised module then lacks a name).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EVERYTHING = (
    "app.runner.dispatch",
    "app.runner.celery_app",
    "app.runner.run",
    "app.runner.embedded",
    "app.runner.reaper",
    "app.main",
    "worker.celery_app",
    "worker.tasks",
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    "first", ["app.runner.dispatch", "app.runner.run", "worker.celery_app", "worker.tasks"]
)
def test_modules_import_in_any_order(first: str) -> None:
    code = (
        "import importlib\n"
        f"importlib.import_module({first!r})\n"
        f"for name in {EVERYTHING!r}:\n"
        "    importlib.import_module(name)\n"
        "from app.runner.celery_app import TASK_NAME\n"
        "from worker.tasks import run_scan_job\n"
        "assert run_scan_job.name == TASK_NAME\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr


def test_the_api_side_imports_neither_worker_nor_celery_until_it_sends() -> None:
    code = (
        "import sys\n"
        "import app.main, app.runner.dispatch, app.runner.run, app.runner.reaper\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('worker', 'celery'))\n"
        "assert not loaded, loaded\n"
        "from app.core.config import Settings\n"
        "from app.runner.dispatch import CeleryDispatcher\n"
        "settings = Settings(JOB_RUNNER='celery', CELERY_BROKER_URL='redis://127.0.0.1:1/0')\n"
        "CeleryDispatcher(settings)._app()  # the producer: Celery loads, worker/ still not\n"
        "assert 'celery' in sys.modules\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'worker'], 'imported worker'\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
