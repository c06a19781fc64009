"""Deleting documents: revoke, wait for every replica, then remove, retrain, purge. No Ray here.

The request (``DELETE /v1/documents/{id}``, ``adapterswap delete``):

1. :func:`request_delete` — ``begin_delete`` in the store, one transaction: every active
   version whose lineage holds the id is revoked and every training one failed, whatever
   earlier deletions or replacements of the id are unfinished; each content of the id the
   catalog holds is recorded ``deleting`` (keyed by id and content hash, with its shard);
   the epoch moves and a delete job is created. It then reads the catalog again: a
   replacement that landed meanwhile is deleted too, so a 200 always means the id is going.
2. :func:`wait_for_replicas` — the barrier: returns once every live serving replica has
   acknowledged that epoch (so has evicted the revoked versions from its adapter bank and
   router cache), or raises :class:`RevocationTimeout`; the revocation stays in force.

The job (:func:`run_deletion`), under the home's train lock, finishes every unfinished
deletion, whichever job started it; each step is idempotent and recorded before the next:

3. ``removed``: the catalog fragments holding the deleted contents are rewritten without
   them (a replacement with the same id but other content stays).
4. ``retrained``: the shards that held them are retrained without them through the training
   path (several documents of one shard: one retraining); a shard left empty is retired.
5. ``purged``: every version that saw them loses its files (weights, router statistics,
   manifest, Ray Train checkpoints) and is marked purged. Done.

A crash anywhere leaves the document unservable (its versions were revoked in step 1, a
version holding it cannot be activated while any deletion of that content is unfinished,
and the id cannot be ingested again until then); running the job again finishes it.

A replacement (``replace: true``) is a deletion of the old content plus an ingest. The new
content lives in a new shard; a version of that shard whose lineage does not record content
hashes cannot be activated until the old content's deletion is purged (a training job in
between reports that shard failed, naming the deletion; the next one trains it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_lock
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import NotFound, RevocationTimeout, StoreError
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.purge import purge_version
from adapterswap.store.jobs import running_job
from adapterswap.store.protocol import Store
from adapterswap.store.records import DeletionRecord, DeletionState, JobRecord, covers_row
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import TrainReport, train_changed_shards
from adapterswap.train.launcher import ShardLauncher
from adapterswap.types import AdapterStatus, AdapterVersion

# A DELETE reads the catalog again after recording the deletion; a replacement that landed
# in between is deleted in a further round. Without the ingest lock, rounds are bounded.
MAX_ROUNDS = 5


@dataclass(frozen=True)
class DeleteRequest:
    """What a delete request did: the job carrying it on, and each deletion's record."""

    job: JobRecord | None  # None: the job already carrying every deletion goes on
    records: list[DeletionRecord]
    held: dict[str, list[str]] = field(default_factory=dict)  # id -> the catalog's contents

    @property
    def epoch(self) -> int:
        return max(r.epoch for r in self.records)

    @property
    def job_id(self) -> str:
        return self.job.job_id if self.job else self.records[0].job_id

    @property
    def content_hashes(self) -> dict[str, list[str | None]]:
        """The contents being deleted, per id (None: any content of the id)."""
        hashes: dict[str, list[str | None]] = {}
        for record in self.records:
            hashes.setdefault(record.doc_id, []).append(record.content_hash)
        return hashes

    @property
    def revoked(self) -> list[dict[str, Any]]:
        refs = sorted({ref for r in self.records for ref in r.revoked})
        return [{"id": ref.id, "version": ref.version} for ref in refs]


def _catalog_rows(catalog: Catalog, doc_ids: Sequence[str]) -> dict[str, dict[str, set[str]]]:
    """id -> content hash -> the shards holding it, for the ids the catalog holds."""
    table = catalog.read(
        ["id", "content_hash", "shard"], filter=pc.field("id").isin(pa.array(doc_ids, pa.string()))
    )
    rows: dict[str, dict[str, set[str]]] = {}
    for row in table.to_pylist():
        rows.setdefault(row["id"], {}).setdefault(row["content_hash"], set()).add(row["shard"])
    return rows


def _uncovered(
    rows: dict[str, dict[str, set[str]]], unfinished: Iterable[DeletionRecord]
) -> dict[str, dict[str, set[str]]]:
    """The catalog contents no deletion will take out (see ``covers_row``)."""
    pending = list(unfinished)
    left: dict[str, dict[str, set[str]]] = {}
    for doc_id, contents in rows.items():
        for content_hash, shards in contents.items():
            if not any(r.doc_id == doc_id and covers_row(r, content_hash) for r in pending):
                left.setdefault(doc_id, {})[content_hash] = shards
    return left


def request_delete(
    store: Store,
    catalog: Catalog,
    doc_ids: Sequence[str],
    runner: str,
    actor: str,
    *,
    lock: Callable[[], AbstractContextManager[Any]] | None = None,
) -> DeleteRequest:
    """Validate the ids and revoke (``store`` answers registry methods synchronously).

    An id the catalog does not hold and that has no unfinished deletion is unknown: NotFound,
    naming every such id, and nothing changes. An id whose deletion is unfinished is revoked
    again (every version holding it now) and answers that deletion's job. ``lock`` (the
    ingest lock, when the caller does not hold it already) makes the catalog read and the
    revocation one step against ingests and replacements; without it, the catalog is read
    again after each revocation until no content of the ids is left uncovered.
    """
    if not doc_ids:
        raise NotFound("doc_ids: give at least one document id")
    wanted = list(dict.fromkeys(doc_ids))
    job: JobRecord | None = None
    records: dict[int, DeletionRecord] = {}
    with lock() if lock is not None else nullcontext():
        rows = _catalog_rows(catalog, wanted)
        in_progress = {r.doc_id for r in store.unfinished_deletions()}
        unknown = [d for d in wanted if d not in rows and d not in in_progress]
        if unknown:
            raise NotFound(f"document {', '.join(repr(d) for d in unknown)} not found")
        todo: dict[str, dict[str, set[str]]] = {d: rows.get(d, {}) for d in wanted}
        for _ in range(MAX_ROUNDS):
            new_job, got = store.begin_delete(
                sorted(todo),
                runner,
                actor=actor,
                content_hashes={d: sorted(c) for d, c in todo.items() if c},
                shards={d: sorted(set().union(*c.values())) for d, c in todo.items() if c},
                job_id=job.job_id if job is not None else None,
            )
            job = job or new_job
            records |= {r.deletion_id: r for r in got}
            rows = _catalog_rows(catalog, wanted)
            todo = _uncovered(rows, store.unfinished_deletions())
            if not todo:
                break
        else:
            raise StoreError(
                f"document {', '.join(map(repr, wanted))} was replaced {MAX_ROUNDS} times while "
                "being deleted; every version seen was revoked: retry the delete"
            )
    # a record revoked again in a later round is newer in the store than in ``records``
    ordered = sorted(records.values(), key=lambda r: (r.doc_id, r.deletion_id))
    held = {d: sorted(c) for d, c in rows.items()}
    return DeleteRequest(job, ordered, held)


def wait_for_replicas(
    store: Store,
    epoch: int,
    *,
    timeout_s: float,
    is_alive: Callable[[str], bool] | None = None,
    poll_s: float = 0.05,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Block until no live replica is behind ``epoch``; returns the seconds it took.

    A replica's acknowledgement means it evicted every version revoked up to ``epoch`` and
    stopped every generation in flight that used one: no token is produced with a revoked
    version after it. The replicas are those registered in the store (their ``ack_epoch``)
    that have not unregistered (``forget_replica``, on a clean stop). One is dropped from
    the barrier only when ``is_alive(replica_id)`` says it is dead (and is then unregistered,
    so no later delete asks again): under Ray Serve the ingress asks Serve's controller;
    without one (``None``) every registered replica counts until it unregisters.
    Missed heartbeats never drop a replica: one that is alive but slow makes this raise
    :class:`RevocationTimeout` after ``timeout_s`` (HTTP 503), the revocation in force.
    """
    every_replica_s = 1e12  # live_replicas(window) lists those seen within it: all of them
    started = time.monotonic()
    while True:
        registered = store.live_replicas(every_replica_s)
        behind = [(r, e) for r, e, _ in registered if e < epoch]
        if behind and is_alive is not None:
            dead = [r for r, _ in behind if not is_alive(r)]
            for replica in dead:
                store.forget_replica(replica)  # it would re-register with its next heartbeat
            behind = [(r, e) for r, e in behind if r not in dead]
        waited = time.monotonic() - started
        if not behind:
            return waited
        if waited >= timeout_s:
            names = ", ".join(f"{r} (at epoch {e})" for r, e in behind)
            raise RevocationTimeout(
                f"revocation to epoch {epoch} is in force in the store, but replicas {names} "
                f"did not acknowledge it within {timeout_s:g} s; they refuse revoked versions "
                "at their next batch step. Retry the delete to wait again"
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
    train_shards: ShardLauncher,
    job_id: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> DeletionReport:
    """Finish every unfinished deletion: remove, retrain (with ``train_shards``), purge (see
    the module docstring)."""
    with running_job(registry, "delete", job_id) as job:
        report = DeletionReport(job=job.job_id)
        _finish_deletions(config, registry, report, train_shards, job.forwarding(on_progress))
        failed = ", ".join(f["id"] for f in report.training.get("failed", []))
        job.finish(asdict(report), error=f"retraining failed: {failed}" if failed else None)
    return report


def _finish_deletions(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    report: DeletionReport,
    train_shards: ShardLauncher,
    on_progress: Callable[[dict[str, Any]], None],
) -> None:
    pending = registry.unfinished_deletions()
    report.documents = sorted({r.doc_id for r in pending})
    if not pending:
        return
    catalog = Catalog(config.storage)
    shards_of = {r.deletion_id: _shards_of(registry, r) for r in pending}
    shards = set().union(*shards_of.values())
    deleting = [r for r in pending if r.state == DeletionState.DELETING]
    if deleting:
        hashes: dict[str, list[str | None]] = {}
        for record in deleting:
            hashes.setdefault(record.doc_id, []).append(record.content_hash)
        with ingest_lock(registry):  # no ingest reads a fragment mid-rewrite
            report.catalog_fragments = catalog.remove(sorted(hashes), hashes)
        registry.advance_deletion(deleting, DeletionState.REMOVED, actor="delete")

    trained = TrainReport()
    train_changed_shards(config, registry, trained, train_shards, on_progress, only=shards)
    report.training = asdict(trained)
    failed = {f["id"] for f in trained.failed}
    present = {s.shard for s in catalog.shard_summaries()}
    report.retired = sorted(shards - present)
    retrained = [r for r in pending if not (shards_of[r.deletion_id] & failed)]
    registry.advance_deletion(retrained, DeletionState.RETRAINED, actor="delete")

    layout = StorageLayout.from_config(config)
    for record in registry.unfinished_deletions():
        if record.state != DeletionState.RETRAINED:
            continue
        for version in _versions_that_saw(registry, record):
            if version.status in (AdapterStatus.REVOKED, AdapterStatus.FAILED):
                purge_version(layout, registry, version.ref, actor="delete")
                report.purged.append(f"{version.adapter_id}@v{version.version}")
        registry.advance_deletion([record], DeletionState.PURGED, actor="delete")


def _versions_that_saw(registry: AdapterRegistry, record: DeletionRecord) -> list[AdapterVersion]:
    """The versions trained on the deleted content (or on the id, content not recorded), and
    those the deletion revoked; current statuses."""
    found = {v.ref: v for v in registry.versions_containing(record.doc_id, record.content_hash)}
    for ref in record.revoked:
        if ref not in found:
            found[ref] = registry.get_version(ref.id, ref.version)
    return [found[ref] for ref in sorted(found)]


def _shards_of(registry: AdapterRegistry, record: DeletionRecord) -> set[str]:
    """The shards a deletion must see retrained: those the catalog held the content in when
    it was requested, and those of the versions it revoked. (A deletion recorded before
    shards were kept: every shard with a version that saw the id.) A replacement's new shard
    is not among them, so its training never holds the old content's deletion back."""
    if record.shards is None:
        return {v.adapter_id for v in registry.versions_containing(record.doc_id)}
    return set(record.shards) | {ref.id for ref in record.revoked}
