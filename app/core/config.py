"""Service settings from environment variables (pydantic-settings), reached via `get_settings()`.

With no variables set the service runs embedded: SQLite and files under ./data, jobs in an
in-process thread. Setting DATABASE_URL and CELERY_BROKER_URL switches to PostgreSQL, Redis and
separate `celery worker -Q gpu` processes. Every field below is one environment variable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

GiB = 1024**3


def normalize_database_url(url: str) -> str:
    """Map the plain postgres URL spellings onto the psycopg 3 driver SQLAlchemy should use."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    """All service settings; field names are the environment variable names."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Storage and database
    DATA_DIR: Path = Field(
        default=Path("data"),
        description="Root for uploads, thumbnails, job work dirs and the SQLite file.",
    )
    DATABASE_URL: str = Field(
        default="", description="SQLAlchemy URL; empty = sqlite:///<DATA_DIR>/scan.db (embedded)."
    )
    MIGRATE_ON_START: bool = Field(
        default=True, description="Run `alembic upgrade head` at API start."
    )
    DB_RETRY_AFTER_S: int = Field(
        default=5, ge=1, description="Retry-After sent with 503 (DB down)."
    )

    # Object storage (app.storage): local files under DATA_DIR, or an S3-compatible store
    STORAGE_BACKEND: Literal["local", "s3"] = Field(
        default="local",
        description="local: objects are files under DATA_DIR (embedded default); s3: objects in "
        "S3_BUCKET, so the API and workers on other hosts share nothing but DB, broker and store.",
    )
    S3_ENDPOINT_URL: str = Field(
        default="", description="S3 endpoint, e.g. http://seaweedfs:8333; empty = AWS."
    )
    S3_PUBLIC_ENDPOINT_URL: str = Field(
        default="",
        description="Endpoint browsers reach for presigned URLs, when it differs from "
        "S3_ENDPOINT_URL (an internal service name); empty = S3_ENDPOINT_URL.",
    )
    S3_BUCKET: str = Field(default="", description="Bucket of every object (STORAGE_BACKEND=s3).")
    S3_REGION: str = Field(default="us-east-1", description="Region the requests are signed for.")
    S3_ACCESS_KEY_ID: str = Field(
        default="", description="Access key; empty = boto3's own chain (instance role...)."
    )
    S3_SECRET_ACCESS_KEY: SecretStr = Field(default=SecretStr(""), description="Its secret.")
    S3_PREFIX: str = Field(
        default="", description="Key prefix inside the bucket, ending in '/' (bucket shared)."
    )
    S3_MULTIPART_PART_BYTES: int = Field(
        default=16 * 1024**2,
        ge=5 * 1024**2,
        description="Objects larger than this go up as multipart uploads in parts of this size "
        "(S3's minimum part is 5 MiB; one part is held in memory at a time).",
    )
    S3_CREATE_BUCKET: bool = Field(
        default=False,
        description="The API creates S3_BUCKET at start when it is missing (a self-contained "
        "stack such as docker-compose.yml; production buckets are made by their admin).",
    )
    S3_TIMEOUT_S: float = Field(default=10.0, gt=0, description="Connect and read timeout.")
    S3_MAX_ATTEMPTS: int = Field(
        default=3, ge=1, description="Attempts per request (retries throttling, resets)."
    )
    PRESIGNED_URL_EXPIRES_S: int = Field(
        default=300, ge=1, le=7 * 24 * 3600, description="Life of a presigned image URL."
    )
    STORAGE_RETRY_AFTER_S: int = Field(
        default=10, ge=1, description="Retry-After sent with 503 (object store unreachable)."
    )

    # Job running
    JOB_RUNNER: Literal["embedded", "celery", ""] = Field(
        default="",
        description="embedded (thread in the API) or celery; empty = celery iff broker set.",
    )
    EMBEDDED_WORKERS: int = Field(
        default=1, ge=1, description="Threads running jobs in embedded mode."
    )
    CELERY_BROKER_URL: str = Field(
        default="", description="Celery broker, e.g. redis://redis:6379/0."
    )
    CELERY_RESULT_BACKEND: str = Field(
        default="", description="Celery result backend; empty = broker."
    )
    CELERY_QUEUE: str = Field(default="gpu", description="Queue the job task is routed to.")
    JOB_SOFT_TIME_LIMIT_S: int = Field(
        default=6 * 3600, ge=1, description="Soft limit: the job fails cleanly with a message."
    )
    JOB_HARD_TIME_LIMIT_S: int = Field(
        default=0, ge=0, description="Hard limit (worker child killed); 0 = soft + 300 s."
    )
    CELERY_VISIBILITY_TIMEOUT_S: int = Field(
        default=0,
        ge=0,
        description="Redis redelivers an unacked task after this (acks_late). 0 = hard limit + "
        "600 s, so a job is normally delivered once; a shorter one is safe (the job lease lets "
        "only one worker run a job; a second delivery exits at once) but wastes deliveries.",
    )
    CELERY_SOFT_SHUTDOWN_TIMEOUT_S: float = Field(
        default=30.0,
        ge=0,
        description="On a cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT) a "
        "running job gets this long, then is requeued at once (not after the visibility timeout).",
    )
    JOB_MAX_ATTEMPTS: int = Field(
        default=5,
        ge=1,
        description="Starts of one job (worker lost, redeployed) before it is marked failed.",
    )
    JOB_LEASE_S: float = Field(
        default=60.0,
        gt=0,
        description="A running job's lease: renewed by its worker's heartbeat; once expired "
        "another worker may take the job over and resume it from its last checkpoint.",
    )
    JOB_HEARTBEAT_S: float = Field(
        default=0.0,
        ge=0,
        description="Seconds between lease renewals; 0 = a quarter of JOB_LEASE_S.",
    )
    REAPER_INTERVAL_S: float = Field(
        default=30.0,
        gt=0,
        description="Every worker looks this often for jobs whose worker died (expired lease) "
        "and hands them out again, or fails them after JOB_MAX_ATTEMPTS.",
    )
    QUEUED_REDISPATCH_S: float = Field(
        default=3600.0,
        gt=0,
        description="A job queued this long without a worker taking it is sent to the queue "
        "again (its message may have been lost with a broker restart); duplicates are harmless.",
    )
    EMBED_SHARD_IMAGES: int = Field(
        default=0,
        ge=0,
        description="Sharded embedding (JOB_RUNNER=celery only): a pretrained-route job whose "
        "dataset has more images than this splits the backbone pass into shards of this many "
        "images that every free worker helps embed (the job's own worker too); that worker "
        "then trains the heads on the gathered features. 0 = never shard. Worth it where one "
        "worker's pass over a dataset takes long and other workers stand idle.",
    )
    JOB_DEVICE: str = Field(
        default="", description="torch device for jobs; empty = CUDA if present."
    )
    DEFAULT_PRESET: str = Field(
        default="pretrained",
        description="Preset when a job request names none. pretrained: features of a named "
        "backbone (DEFAULT_BACKBONE), heads trained on them; cpu, gpu, paper, tiny: SimCLR "
        "from scratch on the collection.",
    )
    DEFAULT_BACKBONE: str = Field(
        default="efficientnet_lite0",
        description="Backbone of pretrained-route jobs that name none. efficientnet_lite0's "
        "weights ship with the package; where the workers hold DINOv2 weights (scan-weights "
        "import / fetch into MODELS_DIR) set dinov2_vits14 for better clusters.",
    )
    MODELS_DIR: Path | None = Field(
        default=None,
        description="Imported backbone weights (the `scan-weights` layout: manifest.json, "
        "weights/<sha256>.safetensors); shared by the API and every worker. Empty = "
        "DATA_DIR/models.",
    )
    PROGRESS_INTERVAL_S: float = Field(
        default=0.5, ge=0, description="Min seconds between DB writes."
    )
    CANCEL_CHECK_INTERVAL_S: float = Field(
        default=1.0, ge=0, description="Min seconds between checks."
    )

    # Upload limits (zip bombs, huge images)
    MAX_UPLOAD_BYTES: int = Field(default=2 * GiB, ge=1, description="Request body limit -> 413.")
    MAX_UNCOMPRESSED_BYTES: int = Field(
        default=8 * GiB, ge=1, description="Sum of entry sizes -> 413."
    )
    MAX_ZIP_ENTRIES: int = Field(default=200_000, ge=1, description="Entries in one zip -> 413.")
    MAX_COMPRESSION_RATIO: float = Field(
        default=200.0,
        gt=1,
        description="Uncompressed/compressed, whole zip -> 413; per entry -> skipped.",
    )
    MAX_ENTRY_BYTES: int = Field(
        default=100 * 1024**2, ge=1, description="Larger zip entries are skipped."
    )
    MAX_IMAGE_PIXELS: int = Field(
        default=40_000_000, ge=1, description="Larger images are skipped (decompression bombs)."
    )
    MIN_IMAGE_SIDE: int = Field(default=8, ge=1, description="Smaller images are skipped.")
    THUMBNAIL_SIZE: int = Field(default=128, ge=16, le=1024, description="Square thumbnail side.")

    # Tenants
    AUTH_MODE: Literal["single_user", "api_keys", ""] = Field(
        default="",
        description="api_keys: every request needs `Authorization: Bearer <key>` or `X-API-Key` "
        "(keys from `scan-admin create-key`); single_user: no keys, everything belongs to one "
        "local owner. Empty = single_user embedded, api_keys in production (DATABASE_URL or "
        "CELERY_BROKER_URL set).",
    )
    ALLOW_SINGLE_USER_IN_PRODUCTION: bool = Field(
        default=False,
        description="Let a production configuration run without API keys (everyone is the "
        "same owner). Off: such a configuration refuses to start.",
    )
    MAX_CONCURRENT_JOBS_PER_OWNER: int = Field(
        default=4, ge=0, description="Queued + running jobs of one owner -> 429; 0 = no limit."
    )
    MAX_STORAGE_BYTES_PER_OWNER: int = Field(
        default=100 * GiB, ge=0, description="Stored image bytes of one owner -> 413; 0 = no limit."
    )

    # Browser sign-in (api_keys mode): a session cookie instead of a key header
    SESSION_TTL_S: int = Field(
        default=12 * 3600,
        ge=60,
        description="A browser session ends this long after sign-in (sign in again after).",
    )
    SESSION_COOKIE_SECURE: bool = Field(
        default=False,
        description="Always mark the session cookie Secure. It is Secure anyway whenever the "
        "request came over https; set this behind a proxy that terminates TLS and does not "
        "forward the scheme.",
    )

    # Server and logs
    HOST: str = Field(default="127.0.0.1", description="scan-service bind address.")
    PORT: int = Field(default=8000, ge=1, le=65535, description="scan-service port.")
    LOG_LEVEL: str = Field(default="INFO", description="Root log level.")
    LOG_FORMAT: Literal["json", "text"] = Field(
        default="json", description="JSON lines or plain text."
    )
    READY_TIMEOUT_S: float = Field(default=2.0, gt=0, description="Timeout of /readyz checks.")

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        # Resolved once so every reader (API, worker, alembic) sees the same absolute values.
        self.DATA_DIR = self.DATA_DIR.expanduser().resolve()
        if self.MODELS_DIR is None or not str(self.MODELS_DIR):
            self.MODELS_DIR = self.DATA_DIR / "models"
        self.MODELS_DIR = self.MODELS_DIR.expanduser().resolve()
        if not self.DATABASE_URL:
            self.DATABASE_URL = f"sqlite:///{self.DATA_DIR / 'scan.db'}"
        self.DATABASE_URL = normalize_database_url(self.DATABASE_URL)
        if not self.JOB_RUNNER:
            self.JOB_RUNNER = "celery" if self.CELERY_BROKER_URL else "embedded"
        if self.JOB_RUNNER == "celery" and not self.CELERY_BROKER_URL:
            raise ValueError("JOB_RUNNER=celery needs CELERY_BROKER_URL")
        if not self.CELERY_RESULT_BACKEND:
            self.CELERY_RESULT_BACKEND = self.CELERY_BROKER_URL
        if not self.JOB_HARD_TIME_LIMIT_S:
            self.JOB_HARD_TIME_LIMIT_S = self.JOB_SOFT_TIME_LIMIT_S + 300
        if self.JOB_HARD_TIME_LIMIT_S <= self.JOB_SOFT_TIME_LIMIT_S:
            raise ValueError("JOB_HARD_TIME_LIMIT_S must exceed JOB_SOFT_TIME_LIMIT_S")
        if not self.CELERY_VISIBILITY_TIMEOUT_S:
            self.CELERY_VISIBILITY_TIMEOUT_S = self.JOB_HARD_TIME_LIMIT_S + 600
        if not self.JOB_HEARTBEAT_S:
            self.JOB_HEARTBEAT_S = self.JOB_LEASE_S / 4
        if self.JOB_HEARTBEAT_S >= self.JOB_LEASE_S:
            raise ValueError("JOB_HEARTBEAT_S must be shorter than JOB_LEASE_S")
        if self.STORAGE_BACKEND == "s3" and not self.S3_BUCKET:
            raise ValueError("STORAGE_BACKEND=s3 needs S3_BUCKET")
        if not self.AUTH_MODE:
            self.AUTH_MODE = "api_keys" if self.is_production else "single_user"
        if (
            self.AUTH_MODE == "single_user"
            and self.is_production
            and not self.ALLOW_SINGLE_USER_IN_PRODUCTION
        ):
            raise ValueError(
                "AUTH_MODE=single_user with DATABASE_URL or CELERY_BROKER_URL set: a production "
                "service needs API keys (AUTH_MODE=api_keys, keys from `scan-admin create-key`); "
                "set ALLOW_SINGLE_USER_IN_PRODUCTION=true to run it without keys anyway"
            )
        return self

    @property
    def is_production(self) -> bool:
        """A shared database or a broker: a deployment others can reach, not a laptop."""
        return not self.is_sqlite or bool(self.CELERY_BROKER_URL)

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use (tests: cache_clear)."""
    return Settings()
