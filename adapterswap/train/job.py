"""A training job: train every shard whose content changed, then publish each new version.

The order of events for each shard keeps every invariant:

1. ``register_version`` records the version as ``training`` with its exact lineage, so a
   delete arriving mid-run can find (and fail) it.
2. Ray Train trains it; rank 0 writes adapter, router statistics and manifest (last).
3. Only then ``activate`` publishes it: one store transaction flips it to active,
   supersedes the previous version and moves the epoch.

A run that fails is marked ``failed`` and its files and checkpoints are deleted; the
previous version keeps serving. A crash of the whole job leaves ``training`` versions
behind; the next job (jobs are serialised by a lock in the home) fails them and sweeps
their files first, along with any version directory the store does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.documents import content_hash
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import IllegalTransition
from adapterswap.models.base import base_model_identity
from adapterswap.storage.fs import delete_dir
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import BaseModelId, read_manifest
from adapterswap.storage.purge import purge_version, sweep_orphans
from adapterswap.store.jobs import running_job
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.launcher import ShardLauncher
from adapterswap.train.plan import ShardWork, shards_to_train
from adapterswap.train.shard import ShardRun, make_shard_run
from adapterswap.types import AdapterRef, AdapterStatus

NOTHING_TO_TRAIN = "nothing to train: every shard's active adapter matches its documents"


@dataclass
class TrainReport:
    """What a training job did."""

    job: str = ""
    trained: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    message: str = ""


def recover_interrupted(layout: StorageLayout, registry: AdapterRegistry) -> list[str]:
    """Fail versions a crashed job left in ``training``, and delete their files and orphans."""
    recovered = []
    for version in registry.list_versions(statuses=[AdapterStatus.TRAINING]):
        registry.fail(version.adapter_id, version.version, reason="job interrupted", actor="train")
        purge_version(layout, registry, version.ref, actor="train")
        recovered.append(f"{version.adapter_id} v{version.version}")
    known = {v.ref for v in registry.list_versions()}
    known -= {v.ref for v in registry.list_versions(statuses=[AdapterStatus.PURGED])}
    recovered += [f"{r.id} v{r.version} (orphan files)" for r in sweep_orphans(layout, known)]
    return recovered


def _register(
    work: ShardWork,
    config: AdapterSwapConfig,
    layout: StorageLayout,
    registry: AdapterRegistry,
    base: BaseModelId,
) -> ShardRun:
    expected = 1 + max((v.version for v in registry.list_versions(work.adapter_id)), default=0)
    uri = layout.uri_of(layout.version(AdapterRef(work.adapter_id, expected)))
    version = registry.register_version(
        work.adapter_id,
        work.group,
        uri,
        work.doc_ids,
        manifest={"data_hash": work.data_hash},
        actor="train",
        # which text of each document it saw: a deletion of an older text does not block it
        content_hashes={d: content_hash(t) for d, t in zip(work.doc_ids, work.texts, strict=True)},
    )
    return make_shard_run(work, version.version, config, base)


def _publish(run: ShardRun, layout: StorageLayout, registry: AdapterRegistry) -> dict[str, Any]:
    ref = run.ref
    manifest = read_manifest(layout.version(ref))
    registry.activate(ref.id, ref.version, manifest=manifest.model_dump(mode="json"), actor="train")
    delete_dir(layout.checkpoints(ref))  # they derive from the shard's documents
    metrics = manifest.metrics.model_dump()
    return {"id": ref.id, "version": ref.version, "group": run.group, **metrics}


def _abandon(
    run: ShardRun, error: str, layout: StorageLayout, registry: AdapterRegistry
) -> dict[str, Any]:
    ref = run.ref
    if registry.get_version(ref.id, ref.version).status == AdapterStatus.TRAINING:
        registry.fail(ref.id, ref.version, reason=error[:500], actor="train")
    purge_version(layout, registry, ref, actor="train")
    return {"id": ref.id, "version": ref.version, "error": error}


def run_training(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    *,
    train_shards: ShardLauncher,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    job_id: str | None = None,
) -> TrainReport:
    """Train and publish every changed shard, the shards trained by ``train_shards`` (on Ray:
    ``actors.train_launcher.train_shards_with_ray``, passed by the CLI and the job runner).

    The work is recorded as job ``job_id`` (created ``pending`` by the submitter), or as a
    new job of this process; jobs queue on the home's train lock.
    """
    with running_job(registry, "train", job_id) as job:
        report = TrainReport(job=job.job_id)
        progress = job.forwarding(on_progress)
        train_changed_shards(config, registry, report, train_shards, progress)
        failed = ", ".join(f["id"] for f in report.failed)
        job.finish(asdict(report), error=f"shards failed: {failed}" if failed else None)
    return report


def train_changed_shards(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    report: TrainReport,
    train_shards: ShardLauncher,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    only: Collection[str] | None = None,
) -> None:
    """The body of a training job (the caller holds the home's train lock): recover, train
    the changed shards (of ``only``, if given) and publish them, filling ``report``."""
    layout = StorageLayout.from_config(config)
    report.recovered = recover_interrupted(layout, registry)
    work = shards_to_train(Catalog(config.storage), registry, only)
    if not work:
        report.message = NOTHING_TO_TRAIN
        return
    base = base_model_identity(config.model, config.model_cache_dir)
    runs = [_register(w, config, layout, registry, base) for w in work]
    outcomes = train_shards(runs, config, on_progress=on_progress)
    for outcome in outcomes:
        error = outcome.error
        if error is None:
            try:
                report.trained.append(_publish(outcome.run, layout, registry))
                continue
            except (OSError, ValueError, KeyError, IllegalTransition) as exc:
                # a missing or unreadable manifest, or a delete that failed the version
                error = f"publishing failed: {type(exc).__name__}: {exc}"
        report.failed.append(_abandon(outcome.run, error, layout, registry))
    report.message = f"trained {len(report.trained)} shard(s), {len(report.failed)} failed"
