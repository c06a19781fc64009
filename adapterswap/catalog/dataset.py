"""The document catalog: a Parquet dataset under ``<storage>/catalog``.

Every ingest appends one fragment file, written atomically (see
:func:`adapterswap.storage.fs.write_atomic`, durably), so a failed or rejected ingest leaves
the catalog exactly as it was. A deletion rewrites, in place and atomically, only the
fragments holding the deleted rows, so the text is gone from storage, not just hidden. Reading goes through ``pyarrow.dataset``; the same code
serves a local directory and an ``s3://`` prefix.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from adapterswap.catalog.documents import Document
from adapterswap.storage.fs import Location, list_files, write_atomic
from adapterswap.storage.layout import StorageLayout

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("batch", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),  # JSON object text
    ]
)


@dataclass(frozen=True)
class Fragment:
    """A catalog fragment encoded but not yet written."""

    name: str
    data: bytes
    rows: int


def _hash_set(value: str | None | Collection[str | None]) -> set[str] | None:
    """The content hashes a removal matches; None: any."""
    if value is None:
        return None
    values = {value} if isinstance(value, str) else set(value)
    return None if None in values else values  # type: ignore[return-value]


@dataclass(frozen=True)
class ShardSummary:
    """One shard as the catalog sees it."""

    shard: str
    group: str
    batch: str
    doc_count: int
    tokens: int


class Catalog:
    """The Parquet document catalog rooted at ``<storage_uri>/catalog``."""

    def __init__(self, storage_uri: str) -> None:
        self.location: Location = StorageLayout.from_uri(storage_uri).catalog()

    def fragments(self) -> list[str]:
        return list_files(self.location, ".parquet")

    def dataset(self) -> ds.Dataset:
        return ds.dataset(
            self.fragments(), schema=SCHEMA, format="parquet", filesystem=self.location.fs
        )

    def read(
        self, columns: Sequence[str] | None = None, filter: pc.Expression | None = None
    ) -> pa.Table:
        """Read the catalog, or the given columns and rows of it."""
        return self.dataset().to_table(columns=list(columns) if columns else None, filter=filter)

    def ids(self) -> set[str]:
        return set(self.read(["id"]).column("id").to_pylist())

    def placements(self) -> dict[str, str]:
        """Document id -> shard id, for every placed document."""
        table = self.read(["id", "shard"])
        return dict(
            zip(table.column("id").to_pylist(), table.column("shard").to_pylist(), strict=True)
        )

    def documents_of_shard(self, shard: str) -> pa.Table:
        return self.read(filter=pc.field("shard") == shard)

    def shard_summaries(self) -> list[ShardSummary]:
        """Every shard with its group, batch, document count and estimated tokens, by shard id."""
        table = self.read(["shard", "group", "batch", "text"])
        tokens = pc.ceil(
            pc.divide(pc.binary_length(pc.cast(table.column("text"), pa.binary())), 4.0)
        )
        table = table.drop_columns(["text"]).append_column("tokens", pc.cast(tokens, pa.int64()))
        grouped = table.group_by(["shard", "group", "batch"]).aggregate(
            [("tokens", "count"), ("tokens", "sum")]
        )
        rows = sorted(grouped.to_pylist(), key=lambda r: r["shard"])
        return [
            ShardSummary(r["shard"], r["group"], r["batch"], r["tokens_count"], r["tokens_sum"])
            for r in rows
        ]

    def append(
        self, docs: Sequence[Document], shards: Sequence[str], batches: Sequence[str]
    ) -> str:
        """Write ``docs`` with their shard and batch as one new fragment; returns its path."""
        return self.write(self.build(docs, shards, batches))

    def build(
        self, docs: Sequence[Document], shards: Sequence[str], batches: Sequence[str]
    ) -> Fragment:
        """Encode ``docs`` as a new fragment without writing it: whatever Parquet refuses
        fails here, before the caller changes anything (an ingest that replaces revokes
        the old versions only after this)."""
        now = datetime.now(UTC)
        table = pa.table(
            {
                "id": [d.id for d in docs],
                "text": [d.text for d in docs],
                "group": [d.group for d in docs],
                "batch": list(batches),
                "shard": list(shards),
                "content_hash": [d.content_hash for d in docs],
                "ingested_at": [now] * len(docs),
                "metadata": [d.metadata for d in docs],
            },
            schema=SCHEMA,
        )
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        name = f"part-{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        return Fragment(name, sink.getvalue(), table.num_rows)

    def write(self, fragment: Fragment) -> str:
        """Write a built fragment atomically; returns its path."""
        target = self.location.child(fragment.name)
        write_atomic(target, fragment.data, durable=True)  # acknowledged ingests survive
        return target.path

    def duplicate_ids(self) -> list[str]:
        """Ids held by more than one row (there should be none), sorted."""
        ids = self.read(["id"]).column("id")
        counts = pc.value_counts(ids).to_pylist()
        return sorted(c["values"] for c in counts if c["counts"] > 1)

    def remove(
        self,
        doc_ids: Iterable[str],
        content_hashes: Mapping[str, str | None | Collection[str | None]] | None = None,
    ) -> list[str]:
        """Rewrite each fragment holding any of ``doc_ids`` without those rows; returns them.

        With ``content_hashes``, a row goes only if its content hash is one given for its id
        (a hash or several; None, or an id not given: any), so a newer version with the same
        id (a replacement) stays. A fragment left empty is deleted. Ids the catalog does not
        hold are ignored, so a removal interrupted after some fragments is finished by
        calling it again.
        """
        hashes = {d: _hash_set(h) for d, h in (content_hashes or {}).items()}
        wanted = set(doc_ids)
        fs, touched = self.location.fs, []
        for path in self.fragments():
            ids = pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_pylist()
            if wanted.isdisjoint(ids):
                continue
            table = pq.read_table(path, filesystem=fs, schema=SCHEMA)
            drop = [
                doc_id in wanted and (hashes.get(doc_id) is None or content in hashes[doc_id])
                for doc_id, content in zip(
                    ids, table.column("content_hash").to_pylist(), strict=True
                )
            ]
            if not any(drop):
                continue
            kept = table.filter(pa.array([not d for d in drop]))
            if kept.num_rows == 0:
                fs.delete_file(path)
            else:
                sink = io.BytesIO()
                pq.write_table(kept, sink, compression="zstd")
                write_atomic(Location(fs, path), sink.getvalue(), durable=True)
            touched.append(path)
        return touched
