"""``adapterswap ingest``: validate documents into the catalog and plan their shards."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from adapterswap.catalog.ingest import ingest_files
from adapterswap.cli.common import open_registry
from adapterswap.cli.progress import embed_with_progress
from adapterswap.config import AdapterSwapConfig
from adapterswap.models.embedder import load_embedder


def ingest_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Ingest ``args.files``; the accepted count, the batch and the planned shards."""
    embed = None
    if config.sharding.strategy == "topical":
        embed = embed_with_progress(load_embedder(config.embedding).embed, "planning shards")
    result = ingest_files(
        args.files,
        config,
        embed=embed,
        audit=open_registry(config),
        actor="cli",
        group=args.group,
        batch=args.batch,
    )
    lines = [f"accepted {result.accepted} documents into batch {result.batch}", "planned shards:"]
    lines += [
        f"  {p.shard:<32} {len(p.doc_ids):>5} docs {p.tokens:>8} tokens" for p in result.shards
    ]
    payload = {
        "accepted": result.accepted,
        "batch": result.batch,
        "shards": [asdict(p) for p in result.shards],
    }
    return "\n".join(lines), payload
