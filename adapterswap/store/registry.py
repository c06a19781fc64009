"""The AdapterStore registry: one SQLite file holding adapters and their versions, API keys,
jobs, deletions, serving replicas' epochs and leases, with an append-only audit log.

Everything lives in one SQLite file (WAL mode). Each mutation is ONE ``BEGIN IMMEDIATE``
transaction, audit row included, committed before the method returns, so an acknowledged
mutation survives a kill. Nothing authoritative is cached in Python: every query reads
SQLite, so several processes (the Ray actor, a CLI) opening the same file stay coherent.
Timestamps are ISO-8601 UTC strings with microseconds (they sort as text).

This module holds the core: the connection and its transactions, migrating the schema on
open, the epoch and the audit log. The epoch is a counter bumped by one in every
transaction that changes the set of active versions (activate, revoke). Serving replicas
compare it to tell whether their view is current. Each table's methods are a mixin of its
own module: versions and lineage (``version_records``), keys (``key_records``), jobs
(``job_records``), deletions (``deletion_records``), replicas (``replica_records``) and
leases (``leases``), each typed against ``core.Transactions``; the schema is in ``schema``,
the records returned in ``records``, the statements every table shares (an audit row, the
epoch) in ``core``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapterswap.errors import StoreError
from adapterswap.storage.privacy import private_file, private_home
from adapterswap.store.core import read_meta, write_audit
from adapterswap.store.deletion_records import DeletionRecords
from adapterswap.store.job_records import JobRecords
from adapterswap.store.key_records import KeyRecords
from adapterswap.store.leases import LeaseRecords
from adapterswap.store.records import AuditEntry, StoreSummary
from adapterswap.store.replica_records import ReplicaRecords
from adapterswap.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    migration_statements,
    stored_schema_version,
)
from adapterswap.store.version_records import VersionRecords
from adapterswap.types import AdapterStatus

BUSY_TIMEOUT_MS = 10_000


class AdapterRegistry(
    VersionRecords, KeyRecords, JobRecords, DeletionRecords, ReplicaRecords, LeaseRecords
):
    """The durable registry over one SQLite file; safe to open from several processes."""

    def __init__(self, db_path: Path | str) -> None:
        """Open (creating if needed) the database at ``db_path`` and its schema."""
        self.db_path = Path(db_path)
        # Key hashes and the audit log: 0600, and SQLite gives its -wal and -shm the same mode.
        private_home(self.db_path.parent)
        for path in (self.db_path, *(Path(f"{self.db_path}{s}") for s in ("-wal", "-shm"))):
            if path == self.db_path or path.exists():
                private_file(path)
        # One connection, guarded by a lock, in autocommit mode: transactions are explicit.
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.db_path, isolation_level=None, check_same_thread=False, timeout=60
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        with self._read() as conn:  # refuse a newer store before changing anything in it
            self._check_not_newer(stored_schema_version(conn))
        self._conn.execute("PRAGMA journal_mode = WAL")
        # FULL fsyncs the WAL at every commit: a commit also survives power loss, not only a kill.
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    def _check_not_newer(self, found: int) -> None:
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"{self.db_path}: schema version {found}, this code reads {SCHEMA_VERSION} at "
                "most; upgrade AdapterSwap or point --home at another directory"
            )

    def _migrate(self) -> None:
        """Bring the store to SCHEMA_VERSION in place: each missing migration in order, all in
        one transaction with the new ``user_version``, so a crash leaves the old version whole."""
        with self._write() as conn:
            found = stored_schema_version(conn)  # again: another process may have migrated
            self._check_not_newer(found)
            for number in range(found + 1, SCHEMA_VERSION + 1):
                for statement in migration_statements(MIGRATIONS[number - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                # meta keeps the version too: code from before migrations reads it there
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (number,))
                if found > 0:  # an existing store was upgraded (a new one is just created)
                    write_audit(conn, "store", "migrate", {"from": number - 1, "to": number})

    def close(self) -> None:
        """Close the connection. The object is unusable afterwards."""
        with self._lock:
            self._conn.close()

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE ... COMMIT transaction; rolled back if the body raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so multi-statement reads see one snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    # -- epoch and summary ---------------------------------------------------------------

    def epoch(self) -> int:
        """The current epoch: bumped with every change to the set of active versions."""
        with self._lock:
            return int(read_meta(self._conn, "epoch"))

    def summary(self) -> StoreSummary:
        """Counts for a status page: adapters, versions by status, keys, audit length."""
        with self._read() as conn:
            by_status = dict.fromkeys((s.value for s in AdapterStatus), 0)
            for status, count in conn.execute(
                "SELECT status, COUNT(*) FROM versions GROUP BY status"
            ):
                by_status[status] = count
            revoked, total = conn.execute(
                "SELECT COUNT(revoked_at), COUNT(*) FROM api_keys"
            ).fetchone()
            return StoreSummary(
                epoch=int(read_meta(conn, "epoch")),
                adapters=conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0],
                versions_by_status=by_status,
                active_keys=total - revoked,
                revoked_keys=revoked,
                last_audit_seq=conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[
                    0
                ],
            )

    # -- audit log -----------------------------------------------------------------------

    def append_audit(self, actor: str, action: str, **details: Any) -> int:
        """Append one audit row (details must be JSON-serialisable); return its seq."""
        with self._write() as conn:
            return write_audit(conn, actor, action, details)

    def audit_log(self, since_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Audit rows with seq > ``since_seq``, oldest first, at most ``limit``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, ts, actor, action, details FROM audit WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (since_seq, limit),
            ).fetchall()
        return [
            AuditEntry(r["seq"], r["ts"], r["actor"], r["action"], json.loads(r["details"]))
            for r in rows
        ]
