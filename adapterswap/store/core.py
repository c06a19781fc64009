"""What the registry's tables share: the transactions every method runs in, and the
statements any transaction may need (append an audit row, read a meta value, bump the epoch).

:class:`~adapterswap.store.registry.AdapterRegistry` provides the transactions. Each table's
methods are a mixin (``*_records.py``, ``leases.py``) whose ``self`` is typed
:class:`Transactions`, so a mixin names no more of the registry than it uses; the SQL a
transaction runs on another table is a plain function of the connection, imported from
that table's module.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import AbstractContextManager
from typing import Any, Protocol

from adapterswap.store.records import timestamp


class Transactions(Protocol):
    """The registry's one connection: a write transaction, a read snapshot, or the bare
    connection under its lock (one statement needs no transaction)."""

    _lock: threading.Lock
    _conn: sqlite3.Connection

    def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...
    def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...


def write_audit(conn: sqlite3.Connection, actor: str, action: str, details: dict[str, Any]) -> int:
    """Append one row to the audit log in the caller's transaction; return its seq."""
    cur = conn.execute(
        "INSERT INTO audit (ts, actor, action, details) VALUES (?, ?, ?, ?)",
        (timestamp(), actor, action, json.dumps(details, sort_keys=True)),
    )
    return int(cur.lastrowid)


def read_meta(conn: sqlite3.Connection, key: str) -> Any:
    """One value of the meta table (``epoch``, ``schema_version``)."""
    return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def bump_epoch(conn: sqlite3.Connection) -> int:
    """Add one to the epoch in the caller's transaction; return the new epoch."""
    return conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'epoch' RETURNING value"
    ).fetchone()[0]
