"""Ingest: read, validate as a whole, plan shards, append one catalog fragment, audit.

Nothing is written unless every record is valid. Concurrent ingests into one home are
serialised by a lock, so the duplicate-id check and the shard numbering cannot race and
catalog ids stay unique; the audit row is written inside the same critical section.

A document whose id has an unfinished deletion is refused, with the job to wait for: the
id was acknowledged deleted, and its old versions are still being purged. One exception:
``replace`` of the id's current row, when that row is not itself being deleted (so
replacing twice in a row works; each replaced content's deletion goes on, and a version
trained on the new text is activated once no deletion of that text is unfinished).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.documents import Document, validate_records
from adapterswap.catalog.planner import ShardPlan, assignments, plan_shards
from adapterswap.catalog.readers import RawRecord, read_inputs
from adapterswap.config import AdapterSwapConfig
from adapterswap.store.locks import exclusive
from adapterswap.store.protocol import Store
from adapterswap.store.records import DeletionRecord, covers_row
from adapterswap.store.registry import AdapterRegistry
from adapterswap.types import Embed

AUTO_BATCH = re.compile(r"b(\d{4,})")


class AuditLog(Protocol):
    """The store, as ingest uses it (a registry, or a proxy to the store actor)."""

    def append_audit(self, actor: str, action: str, **details: object) -> object: ...

    def unfinished_deletions(self) -> list[DeletionRecord]: ...


@dataclass(frozen=True)
class IngestResult:
    """What an accepted ingest did."""

    accepted: int
    batch: str
    shards: list[ShardPlan]
    fragment: str
    replaced: list[str]


def ingest_lock(store: Store) -> AbstractContextManager[str]:
    """The lock that serialises catalog changes: ingests, replacements, the delete request's
    catalog read and the delete job's removal. Every one of them takes it here: the store's
    ``ingest`` lease, so it holds whichever node each of them runs on."""
    return exclusive(store, "ingest")


def next_batch_label(existing: set[str]) -> str:
    """The next automatic batch label: b0001, b0002, ..."""
    numbers = [int(m.group(1)) for b in existing if (m := AUTO_BATCH.fullmatch(b))]
    return f"b{max(numbers, default=0) + 1:04d}"


def ingest_records(
    records: Sequence[RawRecord],
    config: AdapterSwapConfig,
    *,
    embed: Embed | None,
    audit: AuditLog | None = None,
    actor: str = "system",
    group: str | None = None,
    batch: str | None = None,
    problems: Sequence[str] = (),
    replace: Callable[[list[str]], None] | None = None,
) -> IngestResult:
    """Validate ``records`` as a whole, place them in new shards and append them to the catalog.

    Raises :class:`~adapterswap.errors.InvalidDocument` (and writes nothing) when any
    record, or any entry of ``problems`` from the readers, is bad, or when a document's id
    is still being deleted (see the module docstring). ``audit`` is the store (default: the
    home's own): its ``ingest`` lock, its deletions and its audit log. With ``replace``, ids the catalog already holds are allowed: once everything is
    valid and the new fragment is built, ``replace(ids)`` is called (under the ingest lock)
    to delete them and take them out of the catalog, then the new versions are written, into
    new shards like any new batch.
    """
    catalog = Catalog(config.storage)
    if audit is None:  # the home's own store: its lock and its deletions hold here too
        audit = AdapterRegistry(config.db_path)
    with ingest_lock(audit):
        existing = catalog.read(["id", "shard", "batch", "content_hash"])
        current: dict[str, set[str]] = {}
        for doc_id, content in zip(
            existing.column("id").to_pylist(),
            existing.column("content_hash").to_pylist(),
            strict=True,
        ):
            current.setdefault(doc_id, set()).add(content)
        held = set(current)
        replacing = sorted(held & {str(r.fields.get("id")) for r in records}) if replace else []
        pending: dict[str, list[DeletionRecord]] = {}
        for record in audit.unfinished_deletions():
            pending.setdefault(record.doc_id, []).append(record)

        def refuse(doc: Document) -> str | None:
            return _still_deleting(doc, pending.get(doc.id, []), current, set(replacing))

        docs = validate_records(
            records,
            existing_ids=held - set(replacing),
            limits=config.ingest,
            max_tokens=config.sharding.max_shard_tokens,
            group=group,
            batch=batch,
            problems=problems,
            refuse=refuse,
        )
        batch = batch or next_batch_label(set(existing.column("batch").to_pylist()))
        plans = plan_shards(
            docs,
            batch=batch,
            existing_shards=sorted(set(existing.column("shard").to_pylist())),
            settings=config.sharding,
            embed=embed,
        )
        placed = assignments(plans)
        batch_of = {p.shard: p.batch for p in plans}
        shards = [placed[d.id] for d in docs]
        built = catalog.build(docs, shards, [batch_of[s] for s in shards])  # before any revoke
        if replacing and replace is not None:
            replace(replacing)
        fragment = catalog.write(built)
        # in the critical section: no other change lands in between
        audit.append_audit(
            actor,
            "ingest",
            doc_ids=[d.id for d in docs],
            shards=[p.shard for p in plans],
            fragment=fragment,
        )
    return IngestResult(len(docs), batch, plans, fragment, replacing)


def _still_deleting(
    doc: Document,
    deletions: list[DeletionRecord],
    current: dict[str, set[str]],
    replacing: set[str],
) -> str | None:
    """Why ``doc`` cannot be ingested while ``deletions`` (of its id) are unfinished, or None."""
    if doc.id in replacing:  # refused only while its current row is itself being deleted
        rows = current.get(doc.id, set())
        deletions = [r for r in deletions if any(covers_row(r, h) for h in rows)]
    if not deletions:
        return None
    record = deletions[0]
    return (
        f"document {doc.id!r} is still being deleted (deletion {record.state}, job "
        f"{record.job_id}); ingest it again once that job has finished "
        "(`adapterswap status` lists unfinished deletions)"
    )


def ingest_files(
    paths: Sequence[Path], config: AdapterSwapConfig, **kwargs: object
) -> IngestResult:
    """Read JSONL, CSV and Parquet files and ingest their records as one all-or-nothing unit."""
    read = read_inputs(list(paths))
    return ingest_records(read.records, config, problems=read.problems, **kwargs)  # type: ignore[arg-type]
