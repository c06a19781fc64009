"""What ``adapterswap status`` reports: documents, shards, adapters and versions."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from adapterswap.catalog import Catalog
from adapterswap.config import AdapterSwapConfig
from adapterswap.registry import AdapterRegistry


def collect_status(config: AdapterSwapConfig, registry: AdapterRegistry) -> dict[str, Any]:
    """Gather the status as plain data (what ``--json`` prints)."""
    shards = Catalog(config.storage).shard_summaries()
    docs_by_group = Counter()
    for shard in shards:
        docs_by_group[shard.group] += shard.doc_count
    return {
        "home": str(config.home_path),
        "storage": config.storage,
        "documents": {
            "total": sum(docs_by_group.values()),
            "by_group": dict(sorted(docs_by_group.items())),
        },
        "shards": [asdict(s) for s in shards],
        "adapters": [asdict(v) for v in registry.list_versions()],
        "epoch": registry.epoch(),
        "jobs": [asdict(j) for j in registry.list_jobs(states=["pending", "running"])],
        "deletions": [asdict(d) for d in registry.unfinished_deletions()],
    }


def format_status(status: dict[str, Any]) -> str:
    """Render the status for a person."""
    docs = status["documents"]
    lines = [
        f"home     {status['home']}",
        f"storage  {status['storage']}",
        f"documents {docs['total']}"
        + (
            " (" + ", ".join(f"{g}: {n}" for g, n in docs["by_group"].items()) + ")"
            if docs["by_group"]
            else ""
        ),
        f"shards   {len(status['shards'])}",
    ]
    lines += [
        f"  {s['shard']:<32} {s['doc_count']:>5} docs {s['tokens']:>8} tokens"
        for s in status["shards"]
    ]
    lines.append(f"adapter versions {len(status['adapters'])} (epoch {status['epoch']})")
    lines += [
        f"  {a['adapter_id']:<32} v{a['version']:<4} {a['status']:<9} {a['doc_count']:>5} docs"
        for a in status["adapters"]
    ]
    lines.append(f"running jobs {len(status['jobs'])}")
    lines += [
        f"  {j['job_id']:<24} {j['kind']:<7} {j['state']:<8} since {j['created_at']}"
        for j in status["jobs"]
    ]
    if status["deletions"]:
        lines.append(f"unfinished deletions {len(status['deletions'])}")
        lines += [
            f"  {d['doc_id']:<32} {d['state']:<10} job {d['job_id']}" for d in status["deletions"]
        ]
    return "\n".join(lines)
