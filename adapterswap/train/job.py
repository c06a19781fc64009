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
from adapterswap.jobs import running_job
from adapterswap.models.base import hash_base_model
from adapterswap.storage.artifacts import (
    delete_version,
    location_uri,
    read_manifest,
    sweep_orphans,
    version_location,
)
from adapterswap.storage.fs import resolve
from adapterswap.store.registry import AdapterRegistry, AdapterStatus
from adapterswap.train.plan import ShardWork, shards_to_train
from adapterswap.train.shard import ShardRun, make_shard_run

NOTHING_TO_TRAIN = "nothing to train: every shard's active adapter matches its documents"


@dataclass
class TrainReport:
    """What a training job did."""

    job: str = ""
    trained: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    message: str = ""


def delete_checkpoints(config: AdapterSwapConfig, adapter_id: str, version: int) -> None:
    """Remove a run's Ray Train checkpoints: they derive from the shard's documents."""
    loc = resolve(config.storage).child("checkpoints", f"{adapter_id}-v{version}")
    delete_version(loc)


def recover_interrupted(config: AdapterSwapConfig, registry: AdapterRegistry) -> list[str]:
    """Fail versions a crashed job left in ``training``, and delete their files and orphans."""
    recovered = []
    for version in registry.list_versions(statuses=[AdapterStatus.TRAINING]):
        registry.fail(version.adapter_id, version.version, reason="job interrupted", actor="train")
        delete_version(version_location(config.storage, version.adapter_id, version.version))
        delete_checkpoints(config, version.adapter_id, version.version)
        registry.purge(version.adapter_id, version.version, actor="train")
        recovered.append(f"{version.adapter_id} v{version.version}")
    known = {(v.adapter_id, v.version) for v in registry.list_versions()}
    known -= {
        (v.adapter_id, v.version) for v in registry.list_versions(statuses=[AdapterStatus.PURGED])
    }
    recovered += [f"{a} v{v} (orphan files)" for a, v in sweep_orphans(config.storage, known)]
    return recovered


def _register(
    work: ShardWork, config: AdapterSwapConfig, registry: AdapterRegistry, base_hash: str
) -> ShardRun:
    expected = 1 + max((v.version for v in registry.list_versions(work.adapter_id)), default=0)
    uri = location_uri(config.storage, version_location(config.storage, work.adapter_id, expected))
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
    return make_shard_run(work, version.version, config, config.model.spec, base_hash)


def _publish(run: ShardRun, config: AdapterSwapConfig, registry: AdapterRegistry) -> dict[str, Any]:
    manifest = read_manifest(version_location(config.storage, run.adapter_id, run.version))
    registry.activate(run.adapter_id, run.version, manifest=manifest, actor="train")
    return {"id": run.adapter_id, "version": run.version, "group": run.group, **manifest["metrics"]}


def _abandon(
    run: ShardRun, error: str, config: AdapterSwapConfig, registry: AdapterRegistry
) -> dict[str, Any]:
    if registry.get_version(run.adapter_id, run.version).status == AdapterStatus.TRAINING:
        registry.fail(run.adapter_id, run.version, reason=error[:500], actor="train")
    delete_version(version_location(config.storage, run.adapter_id, run.version))
    delete_checkpoints(config, run.adapter_id, run.version)
    registry.purge(run.adapter_id, run.version, actor="train")
    return {"id": run.adapter_id, "version": run.version, "error": error}


def run_training(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    fail_once_at_step: int | None = None,
    job_id: str | None = None,
) -> TrainReport:
    """Train and publish every changed shard with Ray Train (joining or starting Ray if needed).

    The work is recorded as job ``job_id`` (created ``pending`` by the submitter), or as a
    new job of this process; jobs queue on the home's train lock.
    """
    with running_job(registry, "train", job_id) as job:
        report = TrainReport(job=job.job_id)
        progress = job.forwarding(on_progress)
        train_changed_shards(config, registry, report, progress, fail_once_at_step)
        failed = ", ".join(f["id"] for f in report.failed)
        job.finish(asdict(report), error=f"shards failed: {failed}" if failed else None)
    return report


def train_changed_shards(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    report: TrainReport,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    fail_once_at_step: int | None = None,
    only: Collection[str] | None = None,
) -> None:
    """The body of a training job (the caller holds the home's train lock): recover, train
    the changed shards (of ``only``, if given) and publish them, filling ``report``."""
    from actors.train_launcher import train_shards_with_ray

    report.recovered = recover_interrupted(config, registry)
    work = shards_to_train(Catalog(config.storage), registry, only)
    if not work:
        report.message = NOTHING_TO_TRAIN
        return
    base_hash = hash_base_model(config.model, config.model_cache_dir)
    runs = [_register(w, config, registry, base_hash) for w in work]
    outcomes = train_shards_with_ray(
        runs, config, on_progress=on_progress, fail_once_at_step=fail_once_at_step
    )
    for outcome in outcomes:
        error = outcome.error
        if error is None:
            try:
                report.trained.append(_publish(outcome.run, config, registry))
                delete_checkpoints(config, outcome.run.adapter_id, outcome.run.version)
                continue
            except (OSError, ValueError, KeyError, IllegalTransition) as exc:
                # a missing or unreadable manifest, or a delete that failed the version
                error = f"publishing failed: {type(exc).__name__}: {exc}"
        report.failed.append(_abandon(outcome.run, error, config, registry))
    report.message = f"trained {len(report.trained)} shard(s), {len(report.failed)} failed"
