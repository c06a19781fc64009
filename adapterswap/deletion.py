"""Deleting documents: revoke, wait for every replica, then remove, retrain, purge. No Ray here.

The request (``DELETE /v1/documents/{id}``, ``adapterswap delete``):

1. :func:`request_delete` — ``begin_delete`` in the store, one transaction: the document is
   ``deleting``, every active version whose lineage holds it is revoked, every training one
   failed, the epoch moves and a delete job is created.
2. :func:`wait_for_replicas` — the barrier: returns once every live serving replica has
   acknowledged that epoch (so has evicted the revoked versions from its adapter bank and
   router cache), or raises :class:`RevocationTimeout`; the revocation stays in force.

The job (:func:`run_deletion`), under the home's train lock, finishes every unfinished
deletion, whichever job started it; each step is idempotent and recorded before the next:

3. ``removed``: the catalog fragments holding the documents are rewritten without them.
4. ``retrained``: their shards are retrained without them through the training path (several
   documents of one shard: one retraining); a shard left empty is retired (no new version).
5. ``purged``: every version that saw them loses its files (weights, router statistics,
   manifest, Ray Train checkpoints) and is marked purged. Done.

A crash anywhere leaves the document unservable (its versions were revoked in step 1 and a
version holding it cannot be activated while it is ``deleting``); running the job again
finishes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterswap.artifacts import delete_version, version_location
from adapterswap.catalog import Catalog
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import NotFound, RevocationTimeout
from adapterswap.jobs import running_job
from adapterswap.locks import home_lock
from adapterswap.registry import (
    AdapterRegistry,
    AdapterStatus,
    DeletionRecord,
    DeletionState,
    JobRecord,
)
from adapterswap.train_job import TrainReport, delete_checkpoints, train_changed_shards


@dataclass(frozen=True)
class DeleteRequest:
    """What a delete request did: the job carrying it on, and each document's record."""

    job: JobRecord | None  # None: every document was already being deleted
    records: list[DeletionRecord]

    @property
    def epoch(self) -> int:
        return max(r.epoch for r in self.records)

    @property
    def job_id(self) -> str:
        return self.job.job_id if self.job else self.records[0].job_id

    @property
    def content_hashes(self) -> dict[str, str | None]:
        """The deleted version of each document (a replacement with the same id stays)."""
        return {r.doc_id: r.content_hash for r in self.records}

    @property
    def revoked(self) -> list[dict[str, Any]]:
        refs = sorted({ref for r in self.records for ref in r.revoked})
        return [{"id": ref.id, "version": ref.version} for ref in refs]


def request_delete(
    store: Any, catalog: Catalog, doc_ids: Sequence[str], runner: str, actor: str
) -> DeleteRequest:
    """Validate the ids and revoke (``store`` answers registry methods synchronously).

    An id the catalog does not hold and that is not being deleted is unknown: NotFound,
    naming every such id, and nothing changes. An id being deleted is a no-op.
    """
    if not doc_ids:
        raise NotFound("doc_ids: give at least one document id")
    rows = catalog.read(["id", "content_hash"]).to_pylist()
    held = {row["id"]: row["content_hash"] for row in rows}
    in_progress = {r.doc_id for r in store.unfinished_deletions()}
    unknown = [d for d in doc_ids if d not in held and d not in in_progress]
    if unknown:
        raise NotFound(f"document {', '.join(repr(d) for d in unknown)} not found")
    hashes = {d: held[d] for d in doc_ids if d in held}
    job, records = store.begin_delete(list(doc_ids), runner, actor=actor, content_hashes=hashes)
    return DeleteRequest(job, records)


def wait_for_replicas(
    store: Any,
    epoch: int,
    *,
    timeout_s: float,
    live_within_s: float,
    poll_s: float = 0.05,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Block until no live replica is behind ``epoch``; returns the seconds it took."""
    started = time.monotonic()
    while True:
        behind = store.replicas_behind(epoch, live_within_s)
        waited = time.monotonic() - started
        if not behind:
            return waited
        if waited >= timeout_s:
            names = ", ".join(f"{r} (at epoch {e})" for r, e in behind)
            raise RevocationTimeout(
                f"revocation to epoch {epoch} is in force in the store, but replicas {names} "
                f"did not acknowledge it within {timeout_s:g} s; they refuse revoked versions "
                "at their next batch. Retry the delete to wait again"
            )
        sleep(poll_s)


@dataclass
class DeletionReport:
    """What a delete job did."""

    job: str = ""
    documents: list[str] = field(default_factory=list)
    catalog_fragments: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)


def run_deletion(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    *,
    job_id: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> DeletionReport:
    """Finish every unfinished deletion: remove, retrain, purge (see the module docstring)."""
    with running_job(registry, "delete", job_id, config.home_path) as job:
        report = DeletionReport(job=job.job_id)
        _finish_deletions(config, registry, report, job.forwarding(on_progress))
        failed = ", ".join(f["id"] for f in report.training.get("failed", []))
        job.finish(asdict(report), error=f"retraining failed: {failed}" if failed else None)
    return report


def _finish_deletions(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    report: DeletionReport,
    on_progress: Callable[[dict[str, Any]], None],
) -> None:
    pending = registry.unfinished_deletions()
    report.documents = [r.doc_id for r in pending]
    if not pending:
        return
    catalog = Catalog(config.storage)
    shards = _shards_of(registry, pending)
    deleting = [r for r in pending if r.state == DeletionState.DELETING]
    if deleting:
        with home_lock(config.home_path, "ingest"):  # no ingest reads a fragment mid-rewrite
            report.catalog_fragments = catalog.remove(
                [r.doc_id for r in deleting], {r.doc_id: r.content_hash for r in deleting}
            )
        registry.advance_deletion(
            [r.doc_id for r in deleting], DeletionState.REMOVED, actor="delete"
        )

    trained = TrainReport()
    train_changed_shards(config, registry, trained, on_progress, only=shards)
    report.training = asdict(trained)
    failed = {f["id"] for f in trained.failed}
    present = {s.shard for s in catalog.shard_summaries()}
    report.retired = sorted(shards - present)
    retrained = [r.doc_id for r in pending if not (_shard_ids(registry, r.doc_id) & failed)]
    registry.advance_deletion(retrained, DeletionState.RETRAINED, actor="delete")

    for record in registry.unfinished_deletions():
        if record.state != DeletionState.RETRAINED:
            continue
        for version in registry.versions_containing(record.doc_id):
            if version.status in (AdapterStatus.REVOKED, AdapterStatus.FAILED):
                delete_version(
                    version_location(config.storage, version.adapter_id, version.version)
                )
                delete_checkpoints(config, version.adapter_id, version.version)
                registry.purge(version.adapter_id, version.version, actor="delete")
                report.purged.append(f"{version.adapter_id}@v{version.version}")
        registry.advance_deletion([record.doc_id], DeletionState.PURGED, actor="delete")


def _shard_ids(registry: AdapterRegistry, doc_id: str) -> set[str]:
    return {v.adapter_id for v in registry.versions_containing(doc_id)}


def _shards_of(registry: AdapterRegistry, records: Iterable[DeletionRecord]) -> set[str]:
    """The shards the documents were trained into (every version that saw them)."""
    return {shard for r in records for shard in _shard_ids(registry, r.doc_id)}
