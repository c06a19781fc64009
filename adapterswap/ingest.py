"""Ingest: read, validate as a whole, plan shards, append one catalog fragment, audit.

Nothing is written unless every record is valid. Concurrent ingests into one home are
serialised by a lock file, so the duplicate-id check and the shard numbering cannot race.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapterswap.catalog import Catalog
from adapterswap.config import AdapterSwapConfig
from adapterswap.documents import validate_records
from adapterswap.locks import home_lock
from adapterswap.planner import Embed, ShardPlan, assignments, plan_shards
from adapterswap.readers import RawRecord, read_inputs

AUTO_BATCH = re.compile(r"b(\d{4,})")


class AuditLog(Protocol):
    def append_audit(self, actor: str, action: str, **details: object) -> object: ...


@dataclass(frozen=True)
class IngestResult:
    """What an accepted ingest did."""

    accepted: int
    batch: str
    shards: list[ShardPlan]
    fragment: str
    replaced: list[str]


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
    record, or any entry of ``problems`` from the readers, is bad. With ``replace``, ids the
    catalog already holds are allowed: once everything is valid, ``replace(ids)`` is called
    (under the ingest lock) to delete them and take them out of the catalog, then the new
    versions are appended, into new shards like any new batch.
    """
    catalog = Catalog(config.storage)
    with home_lock(config.home_path, "ingest"):
        existing = catalog.read(["id", "shard", "batch"])
        held = set(existing.column("id").to_pylist())
        replacing = sorted(held & {str(r.fields.get("id")) for r in records}) if replace else []
        docs = validate_records(
            records,
            existing_ids=held - set(replacing),
            limits=config.ingest,
            max_tokens=config.sharding.max_shard_tokens,
            group=group,
            batch=batch,
            problems=problems,
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
        if replacing and replace is not None:
            replace(replacing)
        fragment = catalog.append(docs, shards, [batch_of[s] for s in shards])
    if audit is not None:
        audit.append_audit(
            actor,
            "ingest",
            doc_ids=[d.id for d in docs],
            shards=[p.shard for p in plans],
            fragment=fragment,
        )
    return IngestResult(len(docs), batch, plans, fragment, replacing)


def ingest_files(
    paths: Sequence[Path], config: AdapterSwapConfig, **kwargs: object
) -> IngestResult:
    """Read JSONL, CSV and Parquet files and ingest their records as one all-or-nothing unit."""
    read = read_inputs(list(paths))
    return ingest_records(read.records, config, problems=read.problems, **kwargs)  # type: ignore[arg-type]
