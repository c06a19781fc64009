"""``adapterswap status|adapters|audit|backup|restore``: looking after a home."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from adapterswap.api.schemas import MAX_PAGE
from adapterswap.cli.common import UsageError, open_registry
from adapterswap.config import AdapterSwapConfig
from adapterswap.ops.backup import backup_home, restore_home
from adapterswap.ops.status import collect_status, format_status, format_version


def status_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Documents, shards, adapters, versions, jobs and replicas; the cluster with ``--cluster``."""
    cluster = None
    if args.cluster:
        from actors.cluster_status import collect_cluster  # imports ray: only when asked

        cluster = collect_cluster(config)
    status = collect_status(config, open_registry(config), cluster)
    return format_status(status), status


def audit_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """The audit log's entries after ``--since``, at most ``--limit``."""
    entries = open_registry(config).audit_log(args.since, args.limit)
    lines = [
        f"{e.seq:>6} {e.ts} {e.actor:<14} {e.action:<18} {json.dumps(e.details, sort_keys=True)}"
        for e in entries
    ]
    return "\n".join(lines) or "no audit entries", [asdict(e) for e in entries]


def adapters_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """One page of adapter versions, in (id, version) order, from ``--after`` on."""
    if not 1 <= args.limit <= MAX_PAGE:
        raise UsageError(f"--limit: must be 1 to {MAX_PAGE}, got {args.limit}")
    page = open_registry(config).list_versions(
        statuses=_listed(args.status),
        groups=_listed(args.group),
        after=_cursor(args.after),
        limit=args.limit + 1,  # one more says whether there is a next page
    )
    more, page = len(page) > args.limit, page[: args.limit]
    after = f"{page[-1].adapter_id}@v{page[-1].version}" if more else None
    lines = [format_version(asdict(v)) for v in page] or ["no adapter versions"]
    if after is not None:
        lines.append(f"more: adapterswap adapters --after {after}")
    return "\n".join(lines), {"data": [asdict(v) for v in page], "has_more": more, "after": after}


def _listed(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _cursor(value: str | None) -> tuple[str, int] | None:
    """``--after ID`` (past every version of ID) or ``ID@vN`` (past version N of ID)."""
    if value is None:
        return None
    adapter_id, at, version = value.rpartition("@v")
    if not at:
        return value, 2**62
    if not adapter_id or not version.isdigit():
        raise UsageError(f"--after: expected ID or ID@vN (e.g. hr.b0001.000@v2), got {value!r}")
    return adapter_id, int(version)


def backup_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Copy the store, catalog and adapters to ``args.dest``."""
    done = backup_home(config, args.dest)
    text = (
        f"backed up {done.files} files ({done.bytes} bytes, store epoch {done.epoch}) "
        f"to {done.backup}"
    )
    return text, asdict(done)


def restore_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Restore the backup at ``args.src`` into this home and storage."""
    done = restore_home(config, args.src, force=args.force)
    text = (
        f"restored {done.files} files ({done.bytes} bytes, store epoch {done.epoch}) "
        f"from {done.backup} into {config.home_path} and {done.storage}"
    )
    return text, asdict(done)
