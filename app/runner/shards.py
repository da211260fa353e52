"""Sharded embedding: a pretrained-route job's backbone pass split over several Celery workers.

The worker running the job (the coordinator, app.runner.run) splits the dataset's images into
shards of EMBED_SHARD_IMAGES, one `feature_shards` row each, sends one `embed_feature_shards`
task per shard as a Celery group, and then embeds shards itself like any helper. It never
waits on a task (a lone worker would wait on itself for ever), only on shards that another
worker holds under a live lease, and it takes over those whose lease ran out. A shard is taken
with one compare-and-set UPDATE (pending, or running on an expired or dead lease -> running),
so of two workers exactly one gets it, and a heartbeat renews its lease while it embeds.

A shard's rows go to the store whole, as jobs/<job id>/feature_shards/<index>-<token>.npz (a
token per claim: a holder that lost its lease never overwrites or deletes its successor's
file). Once every shard is done the coordinator merges them (scan_engine.feature_shards) into
the dataset's feature-cache entry, under the key the features stage looks up, and deletes the
shard objects and rows; the pipeline then runs as always and finds the features in the cache.

A helper exits without doing anything when its job is finished, cancelled or has no shard left
to take, so a redelivered or surplus task is harmless; it stops mid-shard when the job stops or
its shard lease is lost. The coordinator stops on the job's StopFlag (cancel, lost job lease).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from sqlalchemy import ColumnElement, and_, delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings
from app.db.models import FeatureShard, ShardStatus, utcnow
from app.db.session import get_sessionmaker
from app.runner.claim import ClaimedJob, read_running_job
from app.runner.engine_callbacks import ProgressWriter, StopFlag
from app.runner.leases import Heartbeat, holder_is_dead, lease_is_free, new_holder
from app.storage import (
    FilesystemObjectStore,
    ObjectStore,
    Storage,
    StorageError,
    StorageKeyMissing,
    object_store,
)

if TYPE_CHECKING:
    from scan_engine.config import ScanConfig
    from scan_engine.embedding import EmbeddedFeatures
    from scan_engine.runtime import Runtime
    from scan_engine.sources import ImageSources
    from scan_engine.stages.features import FeatureRecipe

__all__ = [
    "ShardDispatcher",
    "ShardedEmbedding",
    "ShardClaim",
    "embed_in_shards",
    "help_embed_shards",
    "plan_shards",
    "claim_shard",
    "renew_shard",
    "finish_shard",
    "release_shard",
    "shard_prefix",
]

logger = logging.getLogger(__name__)

_WAIT_POLL_S = 0.5  # the coordinator's look at the shards others hold


class ShardDispatcher(Protocol):
    """Sends the helper tasks (app.runner.dispatch.CeleryDispatcher)."""

    def enqueue_shards(self, job_id: str, indexes: list[int]) -> None: ...


@dataclass(frozen=True)
class ShardClaim:
    """A shard this worker holds: embed images start..stop-1 for the entry `cache_key`."""

    id: int
    job_id: str
    index: int
    start: int
    stop: int
    cache_key: str
    content_key: str


@dataclass(frozen=True)
class ShardedEmbedding:
    """What the job's report says about a sharded pass."""

    shards: int
    images: int
    shards_by_worker: dict[str, int]  # worker ("<host>:<pid>:<pid ns>") -> shards embedded

    @property
    def workers(self) -> int:
        return len(self.shards_by_worker)

    def describe(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "workers": self.workers,
            "images": self.images,
            "shards_by_worker": dict(self.shards_by_worker),
        }

    def note(self) -> str:
        workers = "1 worker" if self.workers == 1 else f"{self.workers} workers"
        return f"features embedded in {self.shards} shards by {workers}"


def shard_prefix(job_id: str) -> str:
    """The store folder of a job's shard files (inside the job's folder: deleted with it)."""
    return f"{Storage.job_dir(job_id)}/feature_shards/"


def _worker_name(holder: str) -> str:
    return holder.rsplit(":", 1)[0]  # the holder without its per-claim token


# ---------------------------------------------------------------------------------------------
# The rows


def plan_shards(
    factory: sessionmaker[Session],
    job_id: str,
    cache_key: str,
    content_key: str,
    ranges: list[range],
) -> list[int]:
    """Rows for every shard of `cache_key`; the indexes still to embed. The rows of an earlier
    attempt that planned the same shards are kept (its done shards are not embedded again);
    any others of the job are replaced (their files go with the job's shard folder)."""
    with factory() as session, session.begin():
        rows = session.scalars(select(FeatureShard).where(FeatureShard.job_id == job_id)).all()
        planned = {(row.index, row.start, row.stop, row.cache_key) for row in rows}
        wanted = {(i, r.start, r.stop, cache_key) for i, r in enumerate(ranges)}
        if planned == wanted:
            return sorted(row.index for row in rows if row.status != ShardStatus.DONE)
        stale = len(rows)
        session.execute(delete(FeatureShard).where(FeatureShard.job_id == job_id))
        session.add_all(
            FeatureShard(
                job_id=job_id,
                cache_key=cache_key,
                content_key=content_key,
                index=index,
                start=items.start,
                stop=items.stop,
                status=ShardStatus.PENDING,
                attempts=0,
            )
            for index, items in enumerate(ranges)
        )
    if stale:
        logger.info("replaced %d shards of an earlier plan", stale, extra={"job_id": job_id})
    return list(range(len(ranges)))


def _free_clause(seen_owner: str | None, now: Any) -> ColumnElement[bool]:
    """Compare-and-set guard: the shard still has the holder read before and is free to take
    (pending, or running on an expired lease or a dead holder of this host)."""
    same_owner = (
        FeatureShard.lease_owner.is_(None)
        if seen_owner is None
        else FeatureShard.lease_owner == seen_owner
    )
    expired = or_(
        FeatureShard.lease_expires_at.is_(None),
        FeatureShard.lease_expires_at < now,
        *([FeatureShard.lease_owner == seen_owner] if holder_is_dead(seen_owner) else []),
    )
    running_on_dead_lease = and_(FeatureShard.status == ShardStatus.RUNNING, expired)
    return and_(same_owner, or_(FeatureShard.status == ShardStatus.PENDING, running_on_dead_lease))


def claim_shard(
    factory: sessionmaker[Session],
    job_id: str,
    holder: str,
    lease_s: float,
    prefer: int | None = None,
) -> ShardClaim | None:
    """Take a shard of the job for `holder` (shard `prefer` if it is free, else the first free
    one); None when every shard is done or held under a live lease."""
    now = utcnow()
    with factory() as session, session.begin():
        seen = session.execute(
            select(
                FeatureShard.id,
                FeatureShard.index,
                FeatureShard.status,
                FeatureShard.lease_owner,
                FeatureShard.lease_expires_at,
            )
            .where(FeatureShard.job_id == job_id, FeatureShard.status != ShardStatus.DONE)
            .order_by(FeatureShard.index)
        ).all()
        free = [
            row
            for row in seen
            if row.status == ShardStatus.PENDING
            or lease_is_free("running", row.lease_owner, row.lease_expires_at, now)
        ]
        free.sort(key=lambda row: row.index != prefer)  # stable: the preferred one first
        for row in free:
            # Of two workers updating under the same guard, exactly one gets rowcount 1.
            taken = session.execute(  # type: ignore[attr-defined]
                update(FeatureShard)
                .where(FeatureShard.id == row.id, _free_clause(row.lease_owner, now))
                .values(
                    status=ShardStatus.RUNNING,
                    lease_owner=holder,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=FeatureShard.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            if not taken:
                continue
            if row.status == ShardStatus.RUNNING:
                logger.warning(
                    "taking over shard %d from a worker that stopped (lease out or process gone)",
                    row.index,
                    extra={"job_id": job_id, "previous_holder": row.lease_owner},
                )
            shard = session.get(FeatureShard, row.id)
            assert shard is not None  # just updated, in this transaction
            return ShardClaim(
                shard.id,
                job_id,
                shard.index,
                shard.start,
                shard.stop,
                shard.cache_key,
                shard.content_key,
            )
    return None


def _held(shard_id: int, holder: str) -> list[ColumnElement[bool]]:
    return [
        FeatureShard.id == shard_id,
        FeatureShard.lease_owner == holder,
        FeatureShard.status == ShardStatus.RUNNING,
    ]


def _update(factory: sessionmaker[Session], where: list[Any], values: dict[str, Any]) -> bool:
    with factory() as session, session.begin():
        changed = session.execute(  # type: ignore[attr-defined]
            update(FeatureShard)
            .where(*where)
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
    return bool(changed)


def renew_shard(factory: sessionmaker[Session], shard_id: int, holder: str, lease_s: float) -> bool:
    """Push the shard's lease forward; False when `holder` no longer holds it (or it is gone)."""
    expires = utcnow() + timedelta(seconds=lease_s)
    return _update(factory, _held(shard_id, holder), {"lease_expires_at": expires})


def finish_shard(
    factory: sessionmaker[Session],
    shard_id: int,
    holder: str,
    object_key: str,
    seconds: float,
) -> bool:
    """Mark the shard done with its file's key; False when `holder` lost it meanwhile."""
    values = {
        "status": ShardStatus.DONE,
        "object_key": object_key,
        "embedded_by": _worker_name(holder),
        "seconds": round(seconds, 3),
        "lease_owner": None,
        "lease_expires_at": None,
    }
    return _update(factory, _held(shard_id, holder), values)


def release_shard(factory: sessionmaker[Session], shard_id: int, holder: str) -> None:
    """Give the shard back at once (this worker stops), so another need not wait out a lease."""
    values = {"status": ShardStatus.PENDING, "lease_owner": None, "lease_expires_at": None}
    _update(factory, _held(shard_id, holder), values)


def _redo_shard(factory: sessionmaker[Session], shard_id: int) -> None:
    """A done shard whose file is missing or unreadable: pending again."""
    values = {"status": ShardStatus.PENDING, "object_key": None, "embedded_by": None}
    _update(factory, [FeatureShard.id == shard_id, FeatureShard.status == ShardStatus.DONE], values)


def _shards(factory: sessionmaker[Session], job_id: str) -> list[FeatureShard]:
    with factory() as session:
        rows = session.scalars(
            select(FeatureShard).where(FeatureShard.job_id == job_id).order_by(FeatureShard.index)
        ).all()
        session.expunge_all()
    return list(rows)


def _drop_shards(factory: sessionmaker[Session], store: ObjectStore, job_id: str) -> None:
    """Remove the job's shard rows, then their files (a file left by a store hiccup goes with
    the job's folder)."""
    with factory() as session, session.begin():
        session.execute(delete(FeatureShard).where(FeatureShard.job_id == job_id))
    try:
        store.delete_prefix(shard_prefix(job_id))
    except StorageError:
        logger.warning("could not remove the shard files", extra={"job_id": job_id}, exc_info=True)


# ---------------------------------------------------------------------------------------------
# Embedding one shard (the coordinator and the helpers alike)


@dataclass
class _Embedder:
    """What a worker needs to embed shards of one job: the recipe, the images, the store."""

    recipe: FeatureRecipe
    sources: ImageSources
    runtime: Runtime
    store: ObjectStore
    factory: sessionmaker[Session]
    settings: Settings
    holder: str
    temp_dir: Path
    should_stop: Callable[[], bool]

    def embed(self, claim: ShardClaim, lease: Heartbeat) -> bool:
        """Embed the claimed shard, store its file and mark it done; False when its lease (kept
        by `lease`) was lost on the way: nothing of it is kept. Raises StopRequested when
        `should_stop` turns true (the shard is given back first)."""
        from scan_engine.feature_shards import save_shard

        started = time.monotonic()
        key = f"{shard_prefix(claim.job_id)}{claim.index:05d}-{uuid.uuid4().hex[:12]}.npz"
        try:
            part = self.recipe.embed(
                self.sources,
                self.runtime,
                items=range(claim.start, claim.stop),
                should_stop=lambda: lease.lost.is_set() or self.should_stop(),
            )
            with tempfile.TemporaryDirectory(dir=self.temp_dir) as folder:
                path = save_shard(Path(folder), claim.cache_key, claim.index, part)
                self.store.put_file(key, path)
        except BaseException:
            if not lease.lost.is_set():
                release_shard(self.factory, claim.id, self.holder)
            elif not self.should_stop():
                logger.warning("shard lease lost", extra={"job_id": claim.job_id})
                return False
            raise
        seconds = time.monotonic() - started
        lease.stop()  # before the shard leaves "running": no renewal is refused after it
        if lease.lost.is_set() or not finish_shard(
            self.factory, claim.id, self.holder, key, seconds
        ):
            self.store.delete(key)  # another worker has it now (or the job's shards are gone)
            return False
        logger.info(
            "embedded shard %d (images %d..%d) in %.1f s",
            claim.index,
            claim.start,
            claim.stop - 1,
            seconds,
            extra={"job_id": claim.job_id, "shard": claim.index, "worker": self.holder},
        )
        return True


@contextmanager
def _shard_lease(
    factory: sessionmaker[Session], settings: Settings, claim: ShardClaim, holder: str
) -> Iterator[Heartbeat]:
    """The claimed shard's lease, renewed from the claim on: a helper's first shard includes
    loading the engine and the backbone, which may take longer than the lease."""
    heartbeat = Heartbeat(
        factory,
        claim.job_id,
        holder,
        settings.JOB_LEASE_S,
        settings.JOB_HEARTBEAT_S,
        renew_lease=lambda: renew_shard(factory, claim.id, holder, settings.JOB_LEASE_S),
        what=f"shard {claim.index}",
    ).start()
    try:
        yield heartbeat
    finally:
        heartbeat.stop()


def _runtime(settings: Settings, config: ScanConfig) -> Runtime:
    from scan_engine.runtime import resolve_runtime

    return resolve_runtime(settings.JOB_DEVICE or None, config.precision)


# ---------------------------------------------------------------------------------------------
# The coordinator


def embed_in_shards(
    claimed: ClaimedJob,
    config: ScanConfig,
    sources: ImageSources,
    *,
    store: ObjectStore,
    temp_dir: Path,
    work_dir: Path,
    stop: StopFlag,
    progress: ProgressWriter,
    dispatcher: ShardDispatcher,
    holder: str,
    push_cache: Callable[[], None] | None = None,
    factory: sessionmaker[Session] | None = None,
    settings: Settings | None = None,
) -> ShardedEmbedding | None:
    """Embed the job's images in shards with every free worker and store the merged features
    in the dataset's feature cache (config.feature_cache_dir), where the features stage looks;
    `push_cache` copies that folder to the store (S3) before the shards are deleted.

    None when there is nothing to shard: not the pretrained route, EMBED_SHARD_IMAGES 0, no more
    images than that, or the features already cached. Raises StopRequested when `stop` turns
    true; the shard rows are then kept when the job goes on elsewhere (a lost lease, a
    shutdown) and removed when it ends here (cancelled, or failed by an error).
    """
    from scan_engine.feature_cache import content_key
    from scan_engine.feature_shards import shard_ranges
    from scan_engine.stages.features import FeatureRecipe

    settings = settings or get_settings()
    factory = factory or get_sessionmaker()
    size = settings.EMBED_SHARD_IMAGES
    if config.pretrained_backbone is None or size <= 0 or len(sources) <= size:
        return None
    recipe = FeatureRecipe.for_config(config, work_dir)
    content = content_key(sources)
    cache_key = recipe.cache_key(content)
    if any(recipe.cache.path(key).is_file() for key in recipe.accepted_keys(content)):
        return None  # an earlier job embedded them (the features stage checks the entry)
    ranges = shard_ranges(len(sources), size)
    job_id = claimed.job_id
    try:
        to_embed = plan_shards(factory, job_id, cache_key, content, ranges)
        logger.info(
            "embedding %d images in %d shards of %d (%d to do)",
            len(sources),
            len(ranges),
            size,
            len(to_embed),
            extra={"job_id": job_id},
        )
        try:
            dispatcher.enqueue_shards(job_id, to_embed)
        except Exception:  # no helpers then: this worker embeds every shard itself
            logger.warning(
                "could not send the shard tasks", extra={"job_id": job_id}, exc_info=True
            )
        embedder = _Embedder(
            recipe,
            sources,
            _runtime(settings, config),
            store,
            factory,
            settings,
            holder,
            temp_dir,
            stop,
        )
        parts = _embed_and_gather(embedder, job_id, cache_key, ranges, progress)
        from scan_engine.feature_shards import save_merged

        save_merged(recipe, sources, parts)
        if push_cache is not None:  # the entry in the store before the shards go
            push_cache()
        done = _shards(factory, job_id)
    except BaseException:
        job_goes_on = (stop.lease_lost is not None and stop.lease_lost.is_set()) or (
            stop.shutdown is not None and stop.shutdown.is_set() and not stop.cancelled
        )
        if not job_goes_on:
            try:
                _drop_shards(factory, store, job_id)
            except Exception:  # the job's own error matters more; rows go with the job
                logger.warning(
                    "could not remove the shards", extra={"job_id": job_id}, exc_info=True
                )
        raise
    _drop_shards(factory, store, job_id)
    by_worker: dict[str, int] = {}
    for row in done:
        name = row.embedded_by or "?"
        by_worker[name] = by_worker.get(name, 0) + 1
    sharded = ShardedEmbedding(len(ranges), len(sources), by_worker)
    logger.info(sharded.note(), extra={"job_id": job_id, **sharded.describe()})
    return sharded


def _embed_and_gather(
    embedder: _Embedder,
    job_id: str,
    cache_key: str,
    ranges: list[range],
    progress: ProgressWriter,
) -> list[tuple[range, EmbeddedFeatures]]:
    """Take free shards until none is left, wait for those others hold, read every file back;
    a shard whose file cannot be read is embedded again."""
    from scan_engine.feature_shards import load_shard, shard_name
    from scan_engine.results import ProgressEvent, StopRequested
    from scan_engine.stages.features import FeaturesStage

    factory, store = embedder.factory, embedder.store
    # Sharding is the features stage, run before the pipeline: it fills that stage's share of
    # the run (the writer never lets progress fall back when the pipeline then starts).
    share, started = FeaturesStage.weight_with_fixed_backbone, time.monotonic()
    while True:
        if embedder.should_stop():
            raise StopRequested("stopped while embedding in shards")
        rows = _shards(factory, job_id)
        done = sum(row.status == ShardStatus.DONE for row in rows)
        fraction = share * done / len(ranges)
        elapsed = time.monotonic() - started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
        progress(
            ProgressEvent(
                "features", done / len(ranges), fraction, eta, f"shards {done}/{len(ranges)}"
            )
        )
        claim = claim_shard(factory, job_id, embedder.holder, embedder.settings.JOB_LEASE_S)
        if claim is not None:
            with _shard_lease(factory, embedder.settings, claim, embedder.holder) as lease:
                embedder.embed(claim, lease)
            continue
        if len(rows) != len(ranges):
            raise RuntimeError(f"{len(rows)} shard rows for {len(ranges)} shards")
        if done < len(rows):
            time.sleep(_WAIT_POLL_S)  # others hold the rest under live leases
            continue
        parts: list[tuple[range, EmbeddedFeatures]] = []
        with tempfile.TemporaryDirectory(dir=embedder.temp_dir) as folder:
            for row in rows:
                assert row.object_key is not None  # set with status done
                target = Path(folder) / f"{shard_name(cache_key, row.index)}.npz"
                try:
                    store.get_file(row.object_key, target)
                    part = load_shard(Path(folder), cache_key, row.index)
                except StorageKeyMissing:
                    part = None
                if part is None:
                    logger.warning("shard %d has no readable file: embedding it again", row.index)
                    _redo_shard(factory, row.id)
                    break
                parts.append((ranges[row.index], part))
        if len(parts) == len(ranges):
            return parts


# ---------------------------------------------------------------------------------------------
# A helper (the embed_feature_shards task)


def help_embed_shards(job_id: str, prefer: int | None = None) -> int:
    """Embed shards of running job `job_id` while any is free to take (shard `prefer` first);
    how many. Returns 0 at once when the job is not running or has no free shard."""
    from scan_engine.results import StopRequested

    settings = get_settings()
    factory = get_sessionmaker()
    stop = StopFlag(job_id, factory, settings.CANCEL_CHECK_INTERVAL_S)
    if stop():
        logger.info("job not running: no shard to embed", extra={"job_id": job_id})
        return 0
    holder = new_holder()
    # Claimed before the job's image list is read: most surplus tasks end here, cheaply.
    claim = claim_shard(factory, job_id, holder, settings.JOB_LEASE_S, prefer)
    if claim is None:
        return 0
    claimed = read_running_job(job_id, factory)
    if claimed is None:  # ended meanwhile
        release_shard(factory, claim.id, holder)
        return 0
    store = object_store(settings)
    scratch, lock = _helper_scratch(settings, job_id)
    embedded = 0
    embedder: _Embedder | None = None
    try:
        while claim is not None:
            with _shard_lease(factory, settings, claim, holder) as lease:
                if embedder is None:  # loads the engine and backbone: under the lease
                    embedder = _helper_embedder(
                        claimed, claim, settings, factory, store, scratch, holder
                    )
                    if embedder is None:  # this worker cannot embed for the job: leave it
                        release_shard(factory, claim.id, holder)
                        break
                _fetch_images(claimed, store, embedder.sources, claim)
                embedded += embedder.embed(claim, lease)
            claim = claim_shard(factory, job_id, holder, settings.JOB_LEASE_S)
    except StopRequested:
        logger.info("job stopped: leaving its shards", extra={"job_id": job_id})
    except BaseException:
        if claim is not None:
            release_shard(factory, claim.id, holder)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        lock.close()  # releases the folder's lock
    return embedded


def _helper_scratch(settings: Settings, job_id: str) -> tuple[Path, BinaryIO]:
    """A locked scratch folder of this helper's own (never the job's: its coordinator may run
    on this host); folders of helpers on this host that died are removed."""
    parent = Path(settings.DATA_DIR) / "scratch" / "shards"
    scratch = parent / f"{job_id}-{uuid.uuid4().hex[:12]}"
    lock = Storage.lock_folder(scratch)
    Storage(settings.DATA_DIR).remove_abandoned(parent)
    return scratch, lock


def _helper_embedder(
    claimed: ClaimedJob,
    claim: ShardClaim,
    settings: Settings,
    factory: sessionmaker[Session],
    store: ObjectStore,
    scratch: Path,
    holder: str,
) -> _Embedder | None:
    """The job's recipe on this worker; None when it would not make the job's cache entry
    (other backbone weights or settings here): its shards are then left to other workers."""
    from app.runner.run import job_config
    from scan_engine.sources import ImageSources
    from scan_engine.stages.features import FeatureRecipe

    config = job_config(claimed, settings, scratch / "features")
    recipe = FeatureRecipe.for_config(config, scratch)
    if recipe.cache_key(claim.content_key) != claim.cache_key:
        logger.error(
            "this worker's backbone weights or settings differ from those of the job's worker:"
            " leaving its shards to others",
            extra={"job_id": claimed.job_id},
        )
        return None
    if isinstance(store, FilesystemObjectStore):
        files = [store.path_of(key) for key in claimed.stored_paths]
    else:
        files = [scratch / "images" / key for key in claimed.stored_paths]
    # Every image is listed (positions are global), only the claimed shards' are fetched.
    sources = ImageSources.from_files(list(zip(claimed.image_ids, files, strict=True)))
    stop = StopFlag(claimed.job_id, factory, settings.CANCEL_CHECK_INTERVAL_S)
    runtime = _runtime(settings, config)
    return _Embedder(recipe, sources, runtime, store, factory, settings, holder, scratch, stop)


def _fetch_images(
    claimed: ClaimedJob, store: ObjectStore, sources: ImageSources, claim: ShardClaim
) -> None:
    """The shard's images into the scratch folder (S3; the local store's files are in place)."""
    if isinstance(store, FilesystemObjectStore):
        return
    items = range(claim.start, claim.stop)
    store.get_files([(claimed.stored_paths[i], Path(sources.paths[i])) for i in items])
