"""``adapterswap status|audit|backup|restore``: looking after a home."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from adapterswap.cli.common import open_registry
from adapterswap.config import AdapterSwapConfig
from adapterswap.ops.backup import backup_home, restore_home
from adapterswap.ops.status import collect_status, format_status


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
