"""FastAPI application factory and the `scan-service` entry point.

`scan-service` with no settings: SQLite and files under ./data, migrations applied at start,
jobs run by an in-process worker thread. With DATABASE_URL and CELERY_BROKER_URL set, the same
app uses PostgreSQL and hands jobs to `celery -A worker.celery_app worker -Q gpu` processes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.api.deps import SignInRequired
from app.api.routes import (
    backbones,
    datasets,
    gallery,
    health,
    jobs,
    pages,
    predict,
    results,
    signin,
)
from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.db.migrate import upgrade_to_head
from app.runner.dispatch import make_dispatcher
from app.storage import (
    S3ObjectStore,
    Storage,
    StorageKeyMissing,
    StorageUnavailable,
    object_store,
)

__all__ = ["create_app", "serve"]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def _database_unavailable(
    settings: Settings,
) -> Callable[[Request, Exception], Coroutine[Any, Any, JSONResponse]]:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        is_connection_error = isinstance(error, OperationalError | PoolTimeoutError) or (
            isinstance(error, DBAPIError) and error.connection_invalidated
        )
        if not is_connection_error:
            raise error  # a real bug (bad SQL...): let it be a logged 500
        logger.error("database unavailable: %s", error.__class__.__name__)
        return JSONResponse(
            {"detail": "the database is unavailable; try again later"},
            status_code=503,
            headers={"Retry-After": str(settings.DB_RETRY_AFTER_S)},
        )

    return handler


async def _value_out_of_range(request: Request, error: Exception) -> JSONResponse:
    # A request value the database cannot hold (an offset of 10**30, an id with a NUL byte):
    # the client's mistake, not a server error.
    logger.warning("request value refused by the database: %s", error.__class__.__name__)
    return JSONResponse(
        {"detail": "a value in the request is out of range or not storable"}, status_code=422
    )


def _storage_unavailable(
    settings: Settings,
) -> Callable[[Request, Exception], Coroutine[Any, Any, JSONResponse]]:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        logger.error("object store unavailable: %s", error)
        return JSONResponse(
            {"detail": "the file store is unavailable; try again later"},
            status_code=503,
            headers={"Retry-After": str(settings.STORAGE_RETRY_AFTER_S)},
        )

    return handler


async def _stored_object_missing(request: Request, error: Exception) -> JSONResponse:
    # A row names an object the store no longer has: lost data, reported as such, never a 500.
    logger.warning("stored object missing: %s", error)
    return JSONResponse({"detail": "a stored file of this resource is missing"}, status_code=404)


async def _to_sign_in(request: Request, error: Exception) -> RedirectResponse:
    # A page without a session: the person signs in and comes back to it.
    assert isinstance(error, SignInRequired)
    return RedirectResponse(f"/sign-in?next={quote(error.next_path, safe='')}", status_code=303)


def _create_bucket(settings: Settings) -> None:
    """S3_CREATE_BUCKET: make the bucket; a store that is not up yet only delays readiness."""
    store = object_store(settings)
    if not isinstance(store, S3ObjectStore):
        return
    try:
        if store.create_bucket():
            logger.info("created the bucket %s", store.bucket)
    except StorageUnavailable as error:
        logger.error("could not create the bucket %s: %s", store.bucket, error)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app; at start-up it migrates the DB (MIGRATE_ON_START) and starts the dispatcher."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        Storage(settings.DATA_DIR).clean_stale_temp(max_age_s=24 * 3600)
        if settings.MIGRATE_ON_START:
            await run_in_threadpool(upgrade_to_head, settings.DATABASE_URL)
        if settings.S3_CREATE_BUCKET:
            await run_in_threadpool(_create_bucket, settings)
        dispatcher = make_dispatcher(settings)
        await run_in_threadpool(dispatcher.start)
        app.state.dispatcher = dispatcher
        logger.info(
            "service started", extra={"runner": dispatcher.kind, "auth": settings.AUTH_MODE}
        )
        try:
            yield
        finally:
            await run_in_threadpool(dispatcher.stop)

    app = FastAPI(
        title="SCAN image clustering",
        version="0.1.0",
        description="Upload a zip of images, ask for K groups, get clusters and prototypes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    api = APIRouter(prefix=API_PREFIX)
    api.include_router(backbones.router)
    api.include_router(datasets.router)
    api.include_router(jobs.router)
    api.include_router(results.router)
    api.include_router(gallery.router)
    api.include_router(predict.router)
    app.include_router(api)
    app.include_router(health.router)
    pages.install(app)  # HTML pages and their static files, outside /api
    app.include_router(signin.router)
    handler = _database_unavailable(settings)
    for error_type in (OperationalError, DBAPIError, PoolTimeoutError):
        app.add_exception_handler(error_type, handler)
    for value_error in (DataError, OverflowError):
        app.add_exception_handler(value_error, _value_out_of_range)
    app.add_exception_handler(StorageUnavailable, _storage_unavailable(settings))
    app.add_exception_handler(StorageKeyMissing, _stored_object_missing)
    app.add_exception_handler(SignInRequired, _to_sign_in)
    return app


def serve(argv: Sequence[str] | None = None) -> None:
    """`scan-service`: run the API (and, embedded, the job worker) with uvicorn."""
    import uvicorn

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="scan-service", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=settings.HOST, help="bind address (HOST)")
    parser.add_argument("--port", type=int, default=settings.PORT, help="port (PORT)")
    args = parser.parse_args(argv)
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    logger.info(
        "starting scan-service",
        extra={
            "host": args.host,
            "port": args.port,
            "runner": settings.JOB_RUNNER,
            "data_dir": str(settings.DATA_DIR),
        },
    )
    # One process: the embedded worker lives in it. Scale out with the celery runner instead.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)


if __name__ == "__main__":
    serve()
