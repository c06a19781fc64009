"""What ``adapterswap status`` reports: documents, shards, adapters and versions."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from adapterswap.catalog.dataset import Catalog
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.epoch_watch import live_window_s
from adapterswap.store.registry import AdapterRegistry

STATUS_VERSIONS = 20  # versions status lists; ``adapterswap adapters`` pages through them all


def collect_status(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    cluster: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Gather the status as plain data (what ``--json`` prints); ``cluster`` is added as is."""
    shards = Catalog(config.storage).shard_summaries()
    now = time.time()
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
        "adapters": [asdict(v) for v in registry.list_versions(limit=STATUS_VERSIONS)],
        "versions_by_status": registry.summary().versions_by_status,
        "epoch": registry.epoch(),
        "jobs": [asdict(j) for j in registry.list_jobs(states=["pending", "running"])],
        "deletions": [asdict(d) for d in registry.unfinished_deletions()],
        "replicas": _replicas(config, registry, now),
    } | ({"cluster": cluster} if cluster is not None else {})


def _replicas(
    config: AdapterSwapConfig, registry: AdapterRegistry, now: float
) -> list[dict[str, Any]]:
    """Live serving replicas: epoch, last heartbeat, and the adapters each failed to load."""
    window = live_window_s(config.serve.replica_heartbeat_s)
    details = registry.replica_details(window)
    return [
        {
            "id": r,
            "epoch": e,
            "seen_s_ago": round(max(now - seen, 0.0), 1),
            "failed_loads": details.get(r, {}).get("failed_loads", []),
        }
        for r, e, seen in registry.live_replicas(window)
    ]


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
    lines += _format_versions(status)
    lines.append(f"running jobs {len(status['jobs'])}")
    lines += [
        f"  {j['job_id']:<24} {j['kind']:<7} {j['state']:<8} since {j['created_at']}"
        for j in status["jobs"]
    ]
    replicas, epoch = status["replicas"], status["epoch"]
    behind = [r for r in replicas if r["epoch"] < epoch]
    summary = f"serving replicas {len(replicas)}"
    if behind:
        summary += f" ({len(behind)} behind epoch {epoch})"
    elif replicas:
        summary += " (all at the epoch)"
    lines.append(summary)
    for r in replicas:
        lines.append(f"  {r['id']:<32} epoch {r['epoch']:<6} seen {r['seen_s_ago']:.1f} s ago")
        lines += [
            f"    failed to load {f['adapter_id']} v{f['version']} "
            f"({f['attempts']} attempt{'s' if f['attempts'] != 1 else ''}): {f['error']}"
            for f in r["failed_loads"]
        ]
    if "cluster" in status:
        lines += _format_cluster(status["cluster"])
    if status["deletions"]:
        lines.append(f"unfinished deletions {len(status['deletions'])}")
        lines += [
            f"  {d['doc_id']:<32} {d['state']:<10} job {d['job_id']}" for d in status["deletions"]
        ]
    return "\n".join(lines)


def format_version(a: dict[str, Any]) -> str:
    """One adapter version's line (``status``, ``adapters``)."""
    return (
        f"  {a['adapter_id']:<32} v{a['version']:<4} {a['group']:<12} {a['status']:<9} "
        f"{a['doc_count']:>5} docs"
    )


def _format_versions(status: dict[str, Any]) -> list[str]:
    """Counts by status and the first versions; ``adapterswap adapters`` pages the rest."""
    counts = status["versions_by_status"]
    total = sum(counts.values())
    by_status = ", ".join(f"{s} {n}" for s, n in counts.items() if n)
    lines = [
        f"adapter versions {total} (epoch {status['epoch']})" + (f": {by_status}" if total else "")
    ]
    lines += [format_version(a) for a in status["adapters"]]
    if total > len(status["adapters"]):
        last = status["adapters"][-1]
        lines.append(
            f"  ... {total - len(status['adapters'])} more: "
            f"adapterswap adapters --after {last['adapter_id']}@v{last['version']}"
        )
    return lines


def _format_cluster(cluster: dict[str, Any]) -> list[str]:
    nodes = cluster["nodes"]
    lines = [f"ray nodes {sum(n['alive'] for n in nodes)} alive of {len(nodes)}"]
    for n in nodes:
        resources = ", ".join(f"{k} {v:g}" for k, v in sorted(n["resources"].items()))
        state = "alive" if n["alive"] else "dead"
        lines.append(f"  {n['node_id'][:12]} {n['address']:<15} {state:<5} {resources}")
    for app, info in cluster["serve"].items():
        lines.append(f"serve app {app}: {info['status']}")
        lines += [
            f"  {name:<10} {d['status']:<10} replicas {sum(d['replica_states'].values())}"
            for name, d in info["deployments"].items()
        ]
    return lines
