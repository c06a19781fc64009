"""Which shards need training: those whose content differs from their active version's.

A shard needs a new version when it has no active version, or when the hash of what it
holds now (its (doc id, content hash) pairs) differs from the hash recorded in the active
version's manifest: new shards, and shards that lost documents to a deletion. Every other
shard is left alone, which is what keeps old adapters byte-for-byte unchanged.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from adapterswap.catalog.dataset import Catalog
from adapterswap.storage.artifacts import training_data_hash
from adapterswap.store.registry import AdapterRegistry
from adapterswap.types import AdapterStatus


@dataclass(frozen=True)
class ShardWork:
    """One shard to train, with its rows: the trainer never reads the catalog itself."""

    adapter_id: str
    group: str
    doc_ids: tuple[str, ...]  # sorted
    texts: tuple[str, ...]  # in doc_ids order
    data_hash: str


def shards_to_train(
    catalog: Catalog, registry: AdapterRegistry, only: Collection[str] | None = None
) -> list[ShardWork]:
    """Every shard (of ``only``, if given) whose content has no active version trained on it.

    A shard the catalog no longer holds any document of (all deleted) is not trained.
    """
    index = catalog.read(["shard", "group", "id", "content_hash"])
    if only is not None:
        index = index.filter(pc.field("shard").isin(pa.array(sorted(only), pa.string())))
    hashes: dict[str, list[tuple[str, str]]] = {}
    groups: dict[str, str] = {}
    for row in index.to_pylist():
        hashes.setdefault(row["shard"], []).append((row["id"], row["content_hash"]))
        groups[row["shard"]] = row["group"]
    active = {v.adapter_id: v for v in registry.list_versions(statuses=[AdapterStatus.ACTIVE])}
    changed = []
    for shard, pairs in sorted(hashes.items()):
        current = active.get(shard)
        manifest = registry.manifest(shard, current.version) if current else None
        data_hash = training_data_hash(pairs)
        if manifest is None or manifest.get("data_hash") != data_hash:
            changed.append((shard, data_hash))
    if not changed:
        return []
    wanted = [shard for shard, _ in changed]
    rows = catalog.read(["shard", "id", "text"], filter=pc.field("shard").isin(wanted)).to_pylist()
    texts: dict[str, dict[str, str]] = {}
    for row in rows:
        texts.setdefault(row["shard"], {})[row["id"]] = row["text"]
    return [
        ShardWork(
            adapter_id=shard,
            group=groups[shard],
            doc_ids=tuple(sorted(texts[shard])),
            texts=tuple(texts[shard][d] for d in sorted(texts[shard])),
            data_hash=data_hash,
        )
        for shard, data_hash in changed
    ]
