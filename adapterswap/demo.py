"""``adapterswap demo``: the end-to-end walk-through on the example corpus.

It runs in a fresh ``<home>/demo`` directory so it never touches the user's own state.
Today it covers what exists end to end: ingesting the example organisation's first
batch, printing the planned shards, ingesting a second batch into new shards, and
checking that no first-batch document moved.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterswap.catalog import Catalog
from adapterswap.config import AdapterSwapConfig
from adapterswap.embedding import load_embedder
from adapterswap.errors import AdapterSwapError
from adapterswap.ingest import IngestResult, ingest_files
from adapterswap.registry import AdapterRegistry

Echo = Callable[[str], None] | None
# Each example group holds ~800 tokens in two topics; this bound makes two shards each.
DEMO_SHARD_TOKENS = 500


def default_corpus() -> Path:
    """The repository's examples/ directory (present in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "examples"


def _shard_lines(result: IngestResult, titles: dict[str, str]) -> list[str]:
    lines = []
    for plan in result.shards:
        lines.append(f"  {plan.shard:<26} {len(plan.doc_ids):>2} docs ~{plan.tokens:>5} tokens")
        lines += [f"      {doc_id:<12} {titles.get(doc_id, '')}" for doc_id in plan.doc_ids]
    return lines


def _titles(catalog: Catalog) -> dict[str, str]:
    table = catalog.read(["id", "metadata"]).to_pylist()
    return {row["id"]: json.loads(row["metadata"]).get("title", "") for row in table}


def run_demo(
    config: AdapterSwapConfig, *, corpus: Path | None = None, echo: Echo = print
) -> dict[str, Any]:
    """Run the demonstration and return its report as plain data."""
    say = echo or (lambda _line: None)
    corpus = corpus or default_corpus()
    batch1 = sorted((corpus / "batch1").glob("*.jsonl"))
    batch2 = sorted((corpus / "batch2").glob("*.jsonl"))
    if not batch1:
        raise AdapterSwapError(
            f"no example corpus under {corpus}/batch1: run the demo from a source checkout "
            "or pass --corpus DIR"
        )
    home = config.home_path / "demo"
    shutil.rmtree(home, ignore_errors=True)
    demo = config.model_copy(
        update={
            "home": str(home),
            "storage_uri": None,
            "sharding": config.sharding.model_copy(update={"max_shard_tokens": DEMO_SHARD_TOKENS}),
        }
    )
    registry = AdapterRegistry(demo.db_path)
    catalog = Catalog(demo.storage)
    say(f"AdapterSwap demo in {home}")

    started = time.perf_counter()
    embed = load_embedder(demo.embedding).embed
    say(f"\n[1/2] ingest batch 1: {', '.join(p.name for p in batch1)}")
    first = ingest_files(batch1, demo, embed=embed, audit=registry, actor="demo")
    say(f"accepted {first.accepted} documents; planned {len(first.shards)} shards (topical):")
    for line in _shard_lines(first, _titles(catalog)):
        say(line)
    placed = catalog.placements()

    report: dict[str, Any] = {
        "home": str(home),
        "batch1": first.accepted,
        "shards": [p.shard for p in first.shards],
    }
    if batch2:
        say(f"\n[2/2] ingest batch 2: {', '.join(p.name for p in batch2)}")
        second = ingest_files(batch2, demo, embed=embed, audit=registry, actor="demo")
        say(f"accepted {second.accepted} documents into {len(second.shards)} new shard(s):")
        for line in _shard_lines(second, _titles(catalog)):
            say(line)
        now = catalog.placements()
        moved = sorted(d for d, s in placed.items() if now.get(d) != s)
        say(f"batch-1 documents moved by batch 2: {len(moved)} of {len(placed)}")
        report.update(
            batch2=second.accepted, new_shards=[p.shard for p in second.shards], moved=moved
        )
    report["seconds"] = round(time.perf_counter() - started, 2)
    say(f"\ndone in {report['seconds']} s. Inspect it with: adapterswap --home {home} status")
    return report
