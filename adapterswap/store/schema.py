"""The store's SQLite schema: its ordered migrations and how to read a store's version.

The schema evolves by ordered migrations (``MIGRATIONS``; ``PRAGMA user_version`` says how
many a store has had). Opening a store applies the missing ones in place, in one
transaction (``AdapterRegistry._migrate``); a store written before migrations existed
(``schema_version`` 1 in ``meta``) counts as version 1, and a store newer than this code is
refused before anything changes.

Triggers hold the state machines whoever writes the file: the audit log is append-only, a
deletion only moves forward, and an adapter version's status changes only along the moves
the registry's module docstring lists.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator

from adapterswap.errors import StoreError
from adapterswap.store.records import DeletionState, JobState
from adapterswap.types import AdapterStatus


def _in(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _rank(column: str) -> str:
    """SQL for a deletion state's position in DeletionState's order (for the trigger)."""
    cases = " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(DeletionState))
    return f"(CASE {column} {cases} END)"


# Migration 1: the schema as first released (it wrote schema_version 1 into meta and left
# PRAGMA user_version at 0). Kept byte for byte apart from the literal version.
_MIGRATION_1 = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id TEXT PRIMARY KEY, grp TEXT NOT NULL, created_at TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    adapter_id TEXT NOT NULL REFERENCES adapters(adapter_id),
    version INTEGER NOT NULL CHECK (version >= 1),
    status TEXT NOT NULL CHECK (status IN ({_in(AdapterStatus)})),
    uri TEXT NOT NULL,
    doc_count INTEGER NOT NULL,
    manifest TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS one_active_version ON versions(adapter_id)
    WHERE status = 'active';
CREATE INDEX IF NOT EXISTS versions_by_status ON versions(status);
CREATE TABLE IF NOT EXISTS lineage (
    adapter_id TEXT NOT NULL, version INTEGER NOT NULL, doc_id TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version, doc_id),
    FOREIGN KEY (adapter_id, version) REFERENCES versions(adapter_id, version)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lineage_by_doc ON lineage(doc_id);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, salt BLOB NOT NULL, hash BLOB NOT NULL, user TEXT NOT NULL,
    groups TEXT NOT NULL, admin INTEGER NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, details TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({_in(JobState)})),
    runner TEXT NOT NULL, actor TEXT NOT NULL, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, progress TEXT NOT NULL, result TEXT, error TEXT) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE TABLE IF NOT EXISTS deletions (
    doc_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ({_in(DeletionState)})),
    job_id TEXT NOT NULL, actor TEXT NOT NULL, epoch INTEGER NOT NULL, revoked TEXT NOT NULL,
    requested_at TEXT NOT NULL, updated_at TEXT NOT NULL, content_hash TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, seen_at REAL NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', 1), ('epoch', 0);
"""

# Migration 2: deletions keyed by (document, content hash) with a history (a document may be
# deleted, re-ingested and deleted again), the shards each deletion must retrain, the content
# hash of each lineage document (NULL: unknown, which matches every content of the id), the
# forward-only state machines enforced by triggers, and the leases table for cross-node locks.
_MIGRATION_2 = f"""
CREATE TABLE deletions_v2 (
    deletion_id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    content_hash TEXT,
    state TEXT NOT NULL CHECK (state IN ({_in(DeletionState)})),
    job_id TEXT NOT NULL, actor TEXT NOT NULL, epoch INTEGER NOT NULL, revoked TEXT NOT NULL,
    shards TEXT,
    requested_at TEXT NOT NULL, updated_at TEXT NOT NULL);
INSERT INTO deletions_v2 (doc_id, content_hash, state, job_id, actor, epoch, revoked, shards,
    requested_at, updated_at)
    SELECT doc_id, content_hash, state, job_id, actor, epoch, revoked, NULL, requested_at,
    updated_at FROM deletions ORDER BY requested_at, doc_id;
DROP TABLE deletions;
ALTER TABLE deletions_v2 RENAME TO deletions;
CREATE UNIQUE INDEX one_pending_removal ON deletions(doc_id, COALESCE(content_hash, ''))
    WHERE state = 'deleting';
CREATE INDEX deletions_by_doc ON deletions(doc_id);
CREATE TRIGGER deletions_only_forward BEFORE UPDATE OF state ON deletions
    WHEN {_rank("NEW.state")} < {_rank("OLD.state")}
    BEGIN SELECT RAISE(ABORT, 'a deletion only moves forward'); END;
CREATE TRIGGER versions_only_forward BEFORE UPDATE OF status ON versions
    WHEN NEW.status != OLD.status AND NOT (
        (OLD.status = 'training' AND NEW.status IN ('active', 'failed'))
        OR (OLD.status = 'active' AND NEW.status = 'revoked')
        OR (OLD.status IN ('revoked', 'failed') AND NEW.status = 'purged'))
    BEGIN SELECT RAISE(ABORT, 'illegal adapter version transition'); END;
ALTER TABLE lineage ADD COLUMN content_hash TEXT;
CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL)
    WITHOUT ROWID;
"""

# Migration 3: the epoch at which each version entered and left the active set, so a replica
# that holds epoch E reads only what changed since (``active_changes``) instead of the whole
# active set; and a replica's last report (``replicas.detail``, JSON: e.g. adapters it failed
# to load). Triggers stamp the epochs whoever writes the file, with the epoch the store holds
# when the status changes: the transaction's new epoch, or the one before it for a writer that
# moves the status before bumping, so a delta since E reads stamps >= E (a superset, harmless:
# it reports each version's state now). Rows from before the migration cannot say when they
# changed: ``delta_floor`` in meta is the epoch at migration, deltas since an earlier epoch
# are unavailable (read a full snapshot), and the rows back-fill with that floor ("at or
# before it") where their status says they were active: activated for an active version,
# deactivated for a revoked one (a purged one may never have been active: NULL).
_MIGRATION_3 = """
ALTER TABLE versions ADD COLUMN activated_epoch INTEGER;
ALTER TABLE versions ADD COLUMN deactivated_epoch INTEGER;
INSERT INTO meta (key, value) SELECT 'delta_floor', value FROM meta WHERE key = 'epoch';
UPDATE versions SET activated_epoch = (SELECT value FROM meta WHERE key = 'epoch')
    WHERE status = 'active';
UPDATE versions SET deactivated_epoch = (SELECT value FROM meta WHERE key = 'epoch')
    WHERE status = 'revoked';
CREATE INDEX versions_by_activated ON versions(activated_epoch)
    WHERE activated_epoch IS NOT NULL;
CREATE INDEX versions_by_deactivated ON versions(deactivated_epoch)
    WHERE deactivated_epoch IS NOT NULL;
CREATE TRIGGER versions_stamp_activated AFTER UPDATE OF status ON versions
    WHEN NEW.status = 'active' AND OLD.status != 'active'
    BEGIN UPDATE versions SET activated_epoch = (SELECT value FROM meta WHERE key = 'epoch')
        WHERE adapter_id = NEW.adapter_id AND version = NEW.version; END;
CREATE TRIGGER versions_stamp_deactivated AFTER UPDATE OF status ON versions
    WHEN OLD.status = 'active' AND NEW.status != 'active'
    BEGIN UPDATE versions SET deactivated_epoch = (SELECT value FROM meta WHERE key = 'epoch')
        WHERE adapter_id = NEW.adapter_id AND version = NEW.version; END;
ALTER TABLE replicas ADD COLUMN detail TEXT;
"""

# Ordered: MIGRATIONS[n - 1] takes a store from version n - 1 to n. Append, never edit.
MIGRATIONS: tuple[str, ...] = (_MIGRATION_1, _MIGRATION_2, _MIGRATION_3)
SCHEMA_VERSION = len(MIGRATIONS)


def migration_statements(script: str) -> Iterator[str]:
    """The statements of a script, one at a time (a trigger's body stays whole)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        raise StoreError(f"incomplete SQL statement in a migration: {pending[:80]!r}")


def stored_schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open store: ``PRAGMA user_version``, or for a store written
    before migrations existed, the ``schema_version`` its meta table holds (0: empty file)."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone():
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None:
            found = max(found, int(row[0]))
    return int(found)
