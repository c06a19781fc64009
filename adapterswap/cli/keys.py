"""``adapterswap keys create|list|revoke``: the API keys, each holding a user and its groups."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from adapterswap.cli.common import open_registry
from adapterswap.config import AdapterSwapConfig


def create_key_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Create a key; the secret is shown here once and never again."""
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    key, record = open_registry(config).create_key(args.user, groups, admin=args.admin, actor="cli")
    text = (
        f"created key {record.key_id} for user {record.user} "
        f"(groups: {', '.join(record.groups)}{', admin' if record.admin else ''})\n"
        f"{key}\n"
        "Store it now: it is not shown again."
    )
    return text, {"key": key, **asdict(record)}


def list_keys_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Every key's id, user, groups and state (never the secret)."""
    keys = open_registry(config).list_keys()
    rows = [
        f"  {k.key_id:<14} {k.user:<20} {','.join(k.groups):<30} "
        f"{'admin' if k.admin else '':<6} {'revoked' if k.revoked_at else 'active'}"
        for k in keys
    ]
    return "\n".join([f"{len(keys)} key(s)", *rows]), [asdict(k) for k in keys]


def revoke_key_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Revoke the key ``args.key_id``."""
    record = open_registry(config).revoke_key(args.key_id, actor="cli")
    return f"revoked key {record.key_id} ({record.user})", asdict(record)
