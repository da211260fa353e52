"""The Celery app's configuration and the thin task over app.runner.run.run_job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service_support import use_settings

REPO = Path(__file__).resolve().parents[2]


def test_configuration_follows_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.config import get_settings
    from app.runner.celery_app import TASK_NAME, create_celery_app

    use_settings(
        monkeypatch,
        CELERY_BROKER_URL="redis://broker:6379/3",
        CELERY_RESULT_BACKEND="redis://broker:6379/4",
        JOB_SOFT_TIME_LIMIT_S="600",
        JOB_HARD_TIME_LIMIT_S="700",
        CELERY_VISIBILITY_TIMEOUT_S="900",
    )
    app = create_celery_app(get_settings())
    conf = app.conf
    assert conf.broker_url == "redis://broker:6379/3"
    assert conf.result_backend == "redis://broker:6379/4"
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (600, 700)
    assert conf.broker_transport_options["visibility_timeout"] == 900
    assert conf.task_routes[TASK_NAME] == {"queue": "gpu"}
    assert conf.worker_soft_shutdown_timeout == 30.0
    assert app.amqp.router.route({}, TASK_NAME)["queue"].name == "gpu"


def test_task_is_registered_under_the_dispatch_name() -> None:
    from app.runner.celery_app import TASK_NAME
    from worker.celery_app import celery_app
    from worker.tasks import run_scan_job

    assert run_scan_job.name == TASK_NAME and TASK_NAME in celery_app.tasks
    assert run_scan_job.acks_late is True


def test_the_shard_task_is_registered_and_goes_to_the_job_queue() -> None:
    from app.runner.celery_app import SHARD_TASK_NAME
    from worker.celery_app import celery_app
    from worker.tasks import embed_feature_shards

    assert embed_feature_shards.name == SHARD_TASK_NAME and SHARD_TASK_NAME in celery_app.tasks
    assert embed_feature_shards.acks_late is True
    assert celery_app.amqp.router.route({}, SHARD_TASK_NAME)["queue"].name == "gpu"


def test_import_initialises_no_cuda_and_loads_no_routes() -> None:
    code = (
        "import sys, worker.celery_app, worker.tasks\n"
        "torch = sys.modules.get('torch')\n"
        "assert torch is None or not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "assert not any(m.startswith('app.api') for m in sys.modules), 'worker imported routes'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_task_runs_the_job_function_idempotently(make_job: Any) -> None:
    from app.db.models import Job
    from app.db.session import session_scope
    from worker.tasks import run_scan_job

    make_job("succeeded", id="done")
    make_job("queued", id="stop", cancel_requested=True)
    # apply() runs the task body in this process, through Celery's task machinery.
    assert run_scan_job.apply(args=["done"]).get() == "succeeded"
    assert run_scan_job.apply(args=["done"]).get() == "succeeded"  # a redelivery is harmless
    assert run_scan_job.apply(args=["stop"]).get() == "cancelled"
    assert run_scan_job.apply(args=["missing"]).get() is None
    with session_scope() as session:
        done = session.get(Job, "done")
        assert done is not None and done.attempts == 0 and done.started_at is None
