"""API request and response models (pydantic): DatasetPublic, JobCreate, JobPublic, ..."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _aware(value: datetime | None) -> datetime | None:
    # SQLite drops the zone on the way back; every stored time is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


UTCDateTime = Annotated[datetime, AfterValidator(_aware)]


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class SkippedEntry(BaseModel):
    path: str
    reason: str


class DatasetPublic(_Public):
    id: str
    name: str
    created_at: UTCDateTime
    image_count: int
    total_bytes: int
    has_labels: bool
    class_names: list[str] | None
    skipped_count: int
    skipped: list[SkippedEntry] = Field(description="First skipped entries with the reason.")


class DatasetsPublic(BaseModel):
    items: list[DatasetPublic]
    total: int


class ImagePublic(_Public):
    id: str
    position: int
    filename: str = Field(description="Path inside the uploaded zip.")
    media_type: str
    size_bytes: int
    sha256: str
    width: int
    height: int
    label: int | None


class ImagesPublic(BaseModel):
    dataset_id: str
    items: list[ImagePublic]
    total: int
    offset: int
    limit: int


class BackbonePublic(BaseModel):
    name: str
    feature_dim: int = Field(description="D of the features the heads train on.")
    input_size: int = Field(description="Square side (px) the backbone runs at: the job's size.")
    weights_present: bool = Field(description="A job can use it now (no import needed).")
    weights_source: str | None = Field(
        description="Where the weights are: models_dir, bundled (an installed package) or hub."
    )
    default: bool = Field(description="What a pretrained-route job without `backbone` gets.")
    licence: str
    notes: str
    unavailable_reason: str | None = Field(
        description="Why a job cannot use it, with the scan-weights command that fixes it."
    )


class BackbonesPublic(BaseModel):
    items: list[BackbonePublic]
    default: str = Field(description="DEFAULT_BACKBONE")


class JobCreate(BaseModel):
    """A clustering request. `overrides` is a nested dict for scan_engine.config.make_config."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str
    num_clusters: int | None = Field(
        None,
        ge=2,
        description="K, the number of groups asked for. Leave it and num_clusters_range out to "
        "let the pipeline choose K in [2, min(20, images / 10)].",
    )
    num_clusters_range: tuple[int, int] | None = Field(
        None,
        description="K unknown: [low, high]; the pipeline picks K by a label-free score and "
        "reports every candidate's score in the job's k_selection.",
    )
    overcluster: float | list[int] | None = Field(
        None, description="A factor >= 1 (C = ceil(factor*K)) or a list of extra cluster counts."
    )
    preset: str | None = Field(
        None,
        description="pretrained (features of a backbone), or paper, gpu, cpu, tiny (SimCLR from "
        "scratch); default from settings (DEFAULT_PRESET).",
    )
    backbone: str | None = Field(
        None,
        description="Pretrained route: a backbone from GET /api/v1/backbones whose weights are "
        "present; default DEFAULT_BACKBONE. Not with a scratch preset.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description='Nested config overrides, e.g. {"scan": {"epochs": 5}}.'
    )

    @model_validator(mode="after")
    def _k_or_range(self) -> JobCreate:
        if self.num_clusters is not None and self.num_clusters_range is not None:
            raise ValueError("give num_clusters or num_clusters_range, not both")
        return self


class ResultSetPublic(BaseModel):
    num_clusters: int = Field(description="C, the cluster count this result set was trained for.")
    cluster_count: int = Field(description="Clusters holding at least one image.")
    head: int
    stage: str
    metrics: dict[str, Any] | None


class JobPublic(BaseModel):
    id: str
    dataset_id: str
    status: str
    cancel_requested: bool
    stage: str | None
    progress: float
    eta_s: float | None
    message: str | None
    num_clusters: int | None = Field(
        description="K: as asked, or as chosen by the pipeline (k_selection) once the job has "
        "succeeded; null while it is still to be chosen."
    )
    num_clusters_range: list[int] | None = Field(
        None, description="[low, high] when the pipeline chooses K."
    )
    k_selection: dict[str, Any] | None = Field(
        None,
        description="Every candidate K's label-free score and its parts, and the choice "
        "(scan_engine.model_selection); another candidate can be run as num_clusters.",
    )
    overcluster: float | list[int] | None
    cluster_counts: list[int]
    preset: str
    route: str = Field(description="pretrained (backbone features) or scratch (SimCLR).")
    backbone: str | None = Field(description="The pretrained route's backbone; null: scratch.")
    image_size: int | None = Field(description="Side (px) the images are run at.")
    features_from_cache: bool | None = Field(
        None,
        description="Pretrained route, once run: true when the features came from the dataset's "
        "cache (an earlier job embedded them); null when not known.",
    )
    run_report: dict[str, Any] | None = Field(
        None,
        description="What the engine reported about the route it ran (route, backbone, "
        "image_size, features_from_cache, ...), once the job has run.",
    )
    overrides: dict[str, Any]
    config: dict[str, Any]
    timings: dict[str, float]
    metrics: dict[str, Any] | None
    notes: list[str]
    error: str | None
    attempts: int
    model_path: str | None
    result_sets: list[ResultSetPublic]
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    duration_s: float | None


class JobsPublic(BaseModel):
    items: list[JobPublic]
    total: int


class AssignmentPublic(BaseModel):
    image_id: str
    filename: str
    cluster: int
    confidence: float


class AssignmentsPublic(BaseModel):
    job_id: str
    num_clusters: int
    total: int
    offset: int
    limit: int
    items: list[AssignmentPublic]


class ClusterPublic(BaseModel):
    index: int
    size: int
    mean_confidence: float
    prototype_image_id: str | None
    top_members: list[str]


class ClustersPublic(BaseModel):
    job_id: str
    num_clusters: int
    head: int
    stage: str
    metrics: dict[str, Any] | None
    clusters: list[ClusterPublic]


class Message(BaseModel):
    detail: str


class MapPublic(BaseModel):
    """Parallel arrays (one entry per sampled point), compact for tens of thousands of points."""

    job_id: str
    num_clusters: int
    total: int = Field(description="Images in the job; the map holds a sample of at most `limit`.")
    x: list[float]
    y: list[float]
    cluster: list[int]
    confidence: list[float]
    image_id: list[str]
