"""Typed SQLAlchemy 2 models: owners and API keys, datasets, images, jobs, result sets, clusters,
assignments.

Files live under DATA_DIR and rows keep paths relative to it. Every dataset and job belongs to an
owner (images through their dataset); in single-user mode that is the `local` owner the
migrations create. A running job holds a lease (lease_owner, lease_expires_at) that its worker's
heartbeat renews. The schema changes only via Alembic.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base

__all__ = [
    "LOCAL_OWNER_ID",
    "Owner",
    "ApiKey",
    "BrowserSession",
    "Dataset",
    "Image",
    "Job",
    "JobStatus",
    "ResultSet",
    "Cluster",
    "Assignment",
    "FeatureShard",
    "ShardStatus",
    "new_id",
    "utcnow",
]


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)


LOCAL_OWNER_ID = "local"  # the single-user owner; its row is created by migration 0002


class Owner(Base):
    """A tenant: owns datasets and jobs, authenticates with one or more API keys."""

    __tablename__ = "owners"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key, stored as the sha256 of the whole key; `prefix` (shown, not secret) finds it."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BrowserSession(Base):
    """A browser signed in with an API key: the cookie holds a random token, the row only its
    sha256. Ends at `expires_at`, at sign-out (`ended_at`) or when its key is revoked."""

    __tablename__ = "browser_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token
    api_key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Dataset(Base):
    __tablename__ = "datasets"
    # A repeated upload (same owner, same zip bytes, same labels flag) finds the first one.
    __table_args__ = (
        Index(
            "uq_datasets_owner_content",
            "owner_id",
            "content_sha256",
            "labels_from_folders",
            unique=True,
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    storage_path: Mapped[str] = mapped_column(String(255))  # "datasets/<id>" under DATA_DIR
    image_count: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    has_labels: Mapped[bool] = mapped_column(Boolean, default=False)
    class_names: Mapped[list[str] | None] = mapped_column(JSON)
    skipped: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)  # [{path, reason}]
    skipped_count: Mapped[int] = mapped_column(Integer, default=0)
    content_sha256: Mapped[str | None] = mapped_column(String(64))  # of the uploaded zip
    labels_from_folders: Mapped[bool] = mapped_column(  # as requested at upload
        Boolean, default=False, server_default=false()
    )

    images: Mapped[list[Image]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "position"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)  # order in the dataset (sorted zip paths)
    original_path: Mapped[str] = mapped_column(String(1024))  # path inside the uploaded zip
    stored_path: Mapped[str] = mapped_column(String(255))  # relative to DATA_DIR
    thumbnail_path: Mapped[str] = mapped_column(String(255))  # relative to DATA_DIR
    media_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    label: Mapped[int | None] = mapped_column(Integer)  # index into dataset.class_names

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # What was asked: make_config(preset, num_clusters=..., overcluster=..., **overrides).
    num_clusters: Mapped[int] = mapped_column(Integer)
    overcluster: Mapped[float | list[int] | None] = mapped_column(JSON)  # factor or list of C
    cluster_counts: Mapped[list[int]] = mapped_column(JSON, default=list)  # every C trained
    preset: Mapped[str] = mapped_column(String(32))
    # The pretrained route's backbone (scan_engine.backbones name); None: SimCLR from scratch.
    backbone: Mapped[str | None] = mapped_column(String(64))
    overrides: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # the resolved ScanConfig
    # Progress, written by the running job.
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The lease: exactly one worker runs a job. Taken by an atomic conditional UPDATE, renewed
    # by the worker's heartbeat; after lease_expires_at another worker may take the job over.
    lease_owner: Mapped[str | None] = mapped_column(String(128))  # "<host>:<pid>:<token>"
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Outcome.
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    notes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # The engine report's account of the route it ran (route, backbone, image_size,
    # features_from_cache: whatever of these it gave); None until the job has succeeded.
    run_report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    work_dir: Mapped[str | None] = mapped_column(String(255))  # relative to DATA_DIR
    model_path: Mapped[str | None] = mapped_column(String(255))  # relative to DATA_DIR
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    result_sets: Mapped[list[ResultSet]] = relationship(
        back_populates="job",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ResultSet.num_clusters",
    )


class ResultSet(Base):
    """The clustering for one cluster count C of a job (K itself or an overclustering)."""

    __tablename__ = "result_sets"
    __table_args__ = (UniqueConstraint("job_id", "num_clusters"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    num_clusters: Mapped[int] = mapped_column(Integer)
    head: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="result_sets")


class Cluster(Base):
    __tablename__ = "clusters"
    __table_args__ = (UniqueConstraint("result_set_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_set_id: Mapped[int] = mapped_column(
        ForeignKey("result_sets.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    mean_confidence: Mapped[float] = mapped_column(Float)
    prototype_image_id: Mapped[str | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL")
    )
    top_members: Mapped[list[str]] = mapped_column(JSON, default=list)  # image ids


class Assignment(Base):
    """Image -> cluster for one result set; bulk-inserted, one row per image."""

    __tablename__ = "assignments"
    __table_args__ = (Index("ix_assignments_result_set_id_position", "result_set_id", "position"),)

    result_set_id: Mapped[int] = mapped_column(
        ForeignKey("result_sets.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[str] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer)  # image position, for stable pagination
    cluster: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)


class ShardStatus:
    PENDING = "pending"  # nobody holds it (or its holder's lease expired: app.runner.shards)
    RUNNING = "running"
    DONE = "done"  # its rows are in the store under object_key


class FeatureShard(Base):
    """One range of a job's images whose backbone features one worker embeds (sharded
    embedding, app.runner.shards). Taken with a lease like a job; the rows are gone once the
    job's coordinator has merged every shard into the dataset's feature cache."""

    __tablename__ = "feature_shards"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The feature-cache entry the shards make (scan_engine FeatureRecipe.cache_key) and the
    # content key of the images it was computed from, so a worker can check its own recipe.
    cache_key: Mapped[str] = mapped_column(String(160))
    content_key: Mapped[str] = mapped_column(String(64))
    index: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)  # image positions start..stop-1
    stop: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ShardStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    object_key: Mapped[str | None] = mapped_column(String(255))  # set when done
    embedded_by: Mapped[str | None] = mapped_column(String(128))  # the worker that did it
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
