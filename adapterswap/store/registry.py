"""The AdapterStore registry: adapters, versions, lineage, API keys, audit log and epoch.

Everything lives in one SQLite file (WAL mode). Each mutation is ONE ``BEGIN IMMEDIATE``
transaction, audit row included, committed before the method returns, so an acknowledged
mutation survives a kill. Nothing authoritative is cached in Python: every query reads
SQLite, so several processes (the Ray actor, a CLI) opening the same file stay coherent.
Timestamps are ISO-8601 UTC strings with microseconds (they sort as text).

Adapter version statuses and the only legal transitions::

    method      from               to        note
    ----------  -----------------  --------  ---------------------------------------------
    register    (new version)      training  versions count 1, 2, 3 ... per adapter
    activate    training           active    the adapter's active version, if any, becomes
                                             revoked in the same transaction (superseded)
    fail        training           failed    a training run died; its files get swept up
    revoke      active             revoked   stop serving it (delete, supersede, operator)
    purge       revoked, failed    purged    call once the version's files are deleted

Everything else raises IllegalTransition: a revoked, failed or purged version never comes
back (register a new version instead); a training version is stopped with ``fail``, not
``revoke``; an active version must be revoked before it is purged. A trigger in the
database refuses any other change of status too, whoever writes it.

A version's lineage is the documents it was trained on, each with the content hash it saw
when the trainer says (NULL otherwise, which matches every content of that id).

A deletion is a row keyed by (document id, content hash) that only moves forward (a
trigger refuses a step back), so a crashed delete is finished by running the delete job
again (``adapterswap.delete.job``). At most one deletion per key awaits its catalog removal
(``deleting``): only such a one covers a catalog row with its content, since a row with
that content seen after the removal is a newer one (a replacement by the very same text).
Finished ones stay as history, so an id may be deleted, re-ingested and deleted again::

    state      reached by
    ---------  -----------------------------------------------------------------------------
    deleting   begin_delete, one transaction: revoke EVERY active version whose lineage holds
               the id (whatever earlier deletions of it are unfinished), fail every training
               one, bump the epoch if anything was revoked, record a deletion for each content
               the catalog holds that no ``deleting`` one covers, create the job (or reuse
               the request's; a new job also takes over deletions whose job ended unfinished)
    removed    the row with that content is gone from the catalog (a replacement stays)
    retrained  the shards that held it were retrained without it (or retired, if now empty)
    purged     every version that saw it is purged: files gone, status purged. Done.

While any deletion of a document is unfinished (any state before ``purged``), no version
whose lineage holds that content (or holds the id without a content hash) can be activated.
Serving replicas acknowledge epochs (``ack_epoch``, which never lowers a replica's
acknowledgement) so a delete can wait until every live replica has dropped the revoked
versions (``replicas_behind``).

Jobs (training, deletion) are rows too: ``pending -> running -> succeeded | failed`` (or
``pending -> failed``), with progress and a result, so ``GET /v1/jobs/{id}`` and
``adapterswap status`` read them wherever the job runs.

The epoch is a counter bumped by one in every transaction that changes the set of active
versions (activate, revoke). Serving replicas compare it to tell whether their view is current.

The schema evolves by ordered migrations (``MIGRATIONS``; ``PRAGMA user_version`` says how
many a store has had). Opening a store applies the missing ones in place, in one
transaction; a store written before migrations existed (``schema_version`` 1 in ``meta``)
counts as version 1, and a store newer than this code is refused before anything changes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from adapterswap.errors import IllegalTransition, InvalidArgument, NotFound, StoreError
from adapterswap.storage.privacy import private_file, private_home
from adapterswap.store import keys
from adapterswap.store.keys import KeyRecord, Principal
from adapterswap.store.leases import LeaseRecords

BUSY_TIMEOUT_MS = 10_000
# lookup_key hashes against these for an unknown key id, so it costs what a known one does.
_DUMMY_SALT = keys.new_salt()
_DUMMY_HASH = keys.hash_secret("0" * 64, _DUMMY_SALT)


class AdapterStatus(StrEnum):
    TRAINING = "training"
    ACTIVE = "active"
    REVOKED = "revoked"
    FAILED = "failed"
    PURGED = "purged"


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class DeletionState(StrEnum):
    DELETING = "deleting"
    REMOVED = "removed"
    RETRAINED = "retrained"
    PURGED = "purged"


_DELETION_ORDER = list(DeletionState)

_JOB_FROM: dict[JobState, tuple[JobState, ...]] = {
    JobState.RUNNING: (JobState.PENDING, JobState.RUNNING),  # running again: a progress update
    JobState.SUCCEEDED: (JobState.RUNNING,),
    JobState.FAILED: (JobState.PENDING, JobState.RUNNING),
}


# target status -> the statuses a version may move to it from (see the module docstring).
_ALLOWED_FROM: dict[AdapterStatus, tuple[AdapterStatus, ...]] = {
    AdapterStatus.ACTIVE: (AdapterStatus.TRAINING,),
    AdapterStatus.FAILED: (AdapterStatus.TRAINING,),
    AdapterStatus.REVOKED: (AdapterStatus.ACTIVE,),
    AdapterStatus.PURGED: (AdapterStatus.REVOKED, AdapterStatus.FAILED),
}
_HINTS: dict[tuple[AdapterStatus, AdapterStatus], str] = {
    (AdapterStatus.TRAINING, AdapterStatus.REVOKED): "; stop a training version with fail",
    (AdapterStatus.ACTIVE, AdapterStatus.PURGED): "; revoke it first",
}
_FINAL_HINT = "; register a new version instead"


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

# Ordered: MIGRATIONS[n - 1] takes a store from version n - 1 to n. Append, never edit.
MIGRATIONS: tuple[str, ...] = (_MIGRATION_1, _MIGRATION_2)
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> Iterator[str]:
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


_VERSION_SELECT = """
SELECT v.adapter_id, v.version, a.grp, v.status, v.uri, v.doc_count, v.created_at, v.updated_at
FROM versions v JOIN adapters a ON a.adapter_id = v.adapter_id
"""
_VERSION_ORDER = " ORDER BY v.adapter_id, v.version"
_KEY_COLUMNS = "key_id, user, groups, admin, created_at, revoked_at"


@dataclass(frozen=True, order=True)
class AdapterRef:
    """THE canonical reference to one adapter version, used everywhere."""

    id: str
    version: int


@dataclass(frozen=True)
class AdapterVersion:
    """One adapter version as stored. The adapter id is its shard id."""

    adapter_id: str
    version: int
    shard: str
    group: str
    status: AdapterStatus
    uri: str
    doc_count: int
    created_at: str
    updated_at: str

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.adapter_id, self.version)


@dataclass(frozen=True)
class AuditEntry:
    """One row of the append-only audit log."""

    seq: int
    ts: str
    actor: str
    action: str
    details: dict[str, Any]


@dataclass(frozen=True)
class JobRecord:
    """One job: what it is, where it runs, how far it got and how it ended."""

    job_id: str
    kind: str  # train, delete
    state: JobState
    runner: str  # where it runs: "ray-actor" (named "<job_id>-runner"), "process:<host>:<pid>"
    actor: str  # who submitted it
    created_at: str
    updated_at: str
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED)


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    result = row["result"]
    return JobRecord(
        row["job_id"],
        row["kind"],
        JobState(row["state"]),
        row["runner"],
        row["actor"],
        row["created_at"],
        row["updated_at"],
        json.loads(row["progress"]),
        None if result is None else json.loads(result),
        row["error"],
    )


@dataclass(frozen=True)
class DeletionRecord:
    """One deletion of one content of a document: how far it got, what it revoked.

    A deletion is keyed by (``doc_id``, ``content_hash``): a replacement with the same id has
    another content hash, so its own deletion is told apart from the one it replaced. At most
    one per key awaits its catalog removal; finished (purged) ones stay as history.
    """

    doc_id: str
    state: DeletionState
    job_id: str  # the job carrying it on (a later request re-attaches one whose job ended)
    actor: str
    epoch: int  # the epoch its revocation moved the store to: replicas must reach it
    revoked: list[AdapterRef]
    requested_at: str
    updated_at: str
    content_hash: str | None  # the deleted content's; None: unknown, every content of the id
    deletion_id: int = 0
    shards: tuple[str, ...] | None = None  # the catalog shards that held it (None: unknown)


def _deletion_from_row(row: sqlite3.Row) -> DeletionRecord:
    shards = row["shards"]
    return DeletionRecord(
        row["doc_id"],
        DeletionState(row["state"]),
        row["job_id"],
        row["actor"],
        row["epoch"],
        [AdapterRef(i, v) for i, v in json.loads(row["revoked"])],
        row["requested_at"],
        row["updated_at"],
        row["content_hash"],
        row["deletion_id"],
        None if shards is None else tuple(json.loads(shards)),
    )


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else sorted(set(value))


def covers_row(record: DeletionRecord, content_hash: str | None) -> bool:
    """Whether ``record`` will still take a catalog row with that content out: it has not
    done its catalog removal yet, and its content is that one (None: any content). A row
    with the same content as a deletion already past ``deleting`` is a newer row (a
    replacement by the very same text), which that deletion no longer touches."""
    if record.state != DeletionState.DELETING:
        return False
    return (
        record.content_hash is None or content_hash is None or record.content_hash == content_hash
    )


@dataclass(frozen=True)
class StoreSummary:
    """Counts for a status page, read in one snapshot."""

    epoch: int
    adapters: int
    versions_by_status: dict[str, int]
    active_keys: int
    revoked_keys: int
    last_audit_seq: int


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _version_from_row(row: sqlite3.Row) -> AdapterVersion:
    return AdapterVersion(
        adapter_id=row["adapter_id"],
        version=row["version"],
        shard=row["adapter_id"],
        group=row["grp"],
        status=AdapterStatus(row["status"]),
        uri=row["uri"],
        doc_count=row["doc_count"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _key_from_row(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        user=row["user"],
        groups=tuple(json.loads(row["groups"])),
        admin=bool(row["admin"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _illegal(current: AdapterStatus, target: AdapterStatus, ref: AdapterRef) -> IllegalTransition:
    allowed = _ALLOWED_FROM[target]
    if current in (AdapterStatus.REVOKED, AdapterStatus.FAILED, AdapterStatus.PURGED):
        hint = _HINTS.get((current, target), _FINAL_HINT)
    else:
        hint = _HINTS.get((current, target), "")
    return IllegalTransition(
        f"cannot make adapter {ref.id!r} version {ref.version} {target}: it is {current}, and "
        f"only a {' or '.join(allowed)} version can become {target}{hint}"
    )


class AdapterRegistry(LeaseRecords):
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
                for statement in _statements(MIGRATIONS[number - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                # meta keeps the version too: code from before migrations reads it there
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (number,))
                if found > 0:  # an existing store was upgraded (a new one is just created)
                    self._audit(conn, "store", "migrate", {"from": number - 1, "to": number})

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

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> Any:
        return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    @staticmethod
    def _audit(conn: sqlite3.Connection, actor: str, action: str, details: dict[str, Any]) -> int:
        cur = conn.execute(
            "INSERT INTO audit (ts, actor, action, details) VALUES (?, ?, ?, ?)",
            (_now(), actor, action, json.dumps(details, sort_keys=True)),
        )
        return int(cur.lastrowid)

    @staticmethod
    def _bump_epoch(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'epoch' RETURNING value"
        ).fetchone()[0]

    @staticmethod
    def _version(conn: sqlite3.Connection, adapter_id: str, version: int) -> AdapterVersion:
        row = conn.execute(
            _VERSION_SELECT + " WHERE v.adapter_id = ? AND v.version = ?", (adapter_id, version)
        ).fetchone()
        if row is None:
            raise NotFound(f"adapter {adapter_id!r} version {version} does not exist")
        return _version_from_row(row)

    def _move(
        self, conn: sqlite3.Connection, adapter_id: str, version: int, target: AdapterStatus
    ) -> AdapterVersion:
        """Check the transition table and set the new status; the caller writes the audit row."""
        current = self._version(conn, adapter_id, version)
        if current.status not in _ALLOWED_FROM[target]:
            raise _illegal(current.status, target, current.ref)
        conn.execute(
            "UPDATE versions SET status = ?, updated_at = ? WHERE adapter_id = ? AND version = ?",
            (target.value, _now(), adapter_id, version),
        )
        return self._version(conn, adapter_id, version)

    # -- adapter versions: mutations -----------------------------------------------------

    def register_version(
        self,
        adapter_id: str,
        group: str,
        uri: str,
        doc_ids: Iterable[str],
        *,
        manifest: dict[str, Any] | None = None,
        actor: str = "system",
        content_hashes: Mapping[str, str] | None = None,
    ) -> AdapterVersion:
        """Record a new version (the next integer) of shard ``adapter_id``, status training.

        ``doc_ids`` are exactly the documents this version trains on (its lineage), and
        ``content_hashes`` the content of each it saw, where known. A lineage document without
        one matches every deletion of its id (see ``activate``). An adapter never changes
        group: a shard never mixes groups.
        """
        if not adapter_id:
            raise InvalidArgument("adapter_id: got an empty string; give the shard id")
        keys.validate_group(group)
        docs = sorted(set(doc_ids))
        now = _now()
        with self._write() as conn:
            row = conn.execute(
                "SELECT grp FROM adapters WHERE adapter_id = ?", (adapter_id,)
            ).fetchone()
            if row is None:
                conn.execute("INSERT INTO adapters VALUES (?, ?, ?)", (adapter_id, group, now))
            elif row["grp"] != group:
                raise InvalidArgument(
                    f"group: adapter {adapter_id!r} belongs to group {row['grp']!r}, got "
                    f"{group!r}; a shard never changes group"
                )
            version = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE adapter_id = ?",
                (adapter_id,),
            ).fetchone()[0]
            manifest_json = None if manifest is None else json.dumps(manifest, sort_keys=True)
            values = (adapter_id, version, "training", uri, len(docs), manifest_json, now, now)
            conn.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)
            hashes = content_hashes or {}
            conn.executemany(
                "INSERT INTO lineage (adapter_id, version, doc_id, content_hash) VALUES (?, ?, ?, ?)",
                ((adapter_id, version, d, hashes.get(d)) for d in docs),
            )
            details = {"id": adapter_id, "version": version, "group": group, "uri": uri}
            self._audit(conn, actor, "register", details | {"doc_count": len(docs)})
            return self._version(conn, adapter_id, version)

    def activate(
        self,
        adapter_id: str,
        version: int,
        *,
        manifest: dict[str, Any] | None = None,
        actor: str = "system",
    ) -> AdapterVersion:
        """Make a training version active, revoking (superseding) the adapter's active one.

        ``manifest``, when given, replaces the one recorded at registration (the final one,
        with the run's metrics), in the same transaction.
        """
        with self._write() as conn:
            current = self._version(conn, adapter_id, version)
            if current.status != AdapterStatus.TRAINING:  # checked before touching the old one
                raise _illegal(current.status, AdapterStatus.ACTIVE, current.ref)
            deleting = conn.execute(
                "SELECT l.doc_id, d.state, d.job_id FROM lineage l JOIN deletions d "
                "ON d.doc_id = l.doc_id WHERE l.adapter_id = ? AND l.version = ? "
                "AND d.state != 'purged' AND (d.content_hash IS NULL OR l.content_hash IS NULL "
                "OR d.content_hash = l.content_hash) ORDER BY d.deletion_id LIMIT 1",
                (adapter_id, version),
            ).fetchone()
            if deleting is not None:
                raise IllegalTransition(
                    f"{adapter_id} v{version} cannot be activated: its lineage holds document "
                    f"{deleting[0]!r}, whose deletion is unfinished ({deleting[1]}, job "
                    f"{deleting[2]}); train the shard again once that deletion is done"
                )
            if manifest is not None:
                conn.execute(
                    "UPDATE versions SET manifest = ? WHERE adapter_id = ? AND version = ?",
                    (json.dumps(manifest, sort_keys=True), adapter_id, version),
                )
            old = conn.execute(
                "SELECT version FROM versions WHERE adapter_id = ? AND status = 'active'",
                (adapter_id,),
            ).fetchone()
            if old is not None:
                self._move(conn, adapter_id, old[0], AdapterStatus.REVOKED)
            activated = self._move(conn, adapter_id, version, AdapterStatus.ACTIVE)
            epoch = self._bump_epoch(conn)  # one change of the active set: +1, supersede or not
            if old is not None:
                details = {"id": adapter_id, "version": old[0], "epoch": epoch}
                details |= {"reason": "superseded", "superseded_by": version}
                self._audit(conn, actor, "revoke", details)
            details = {"id": adapter_id, "version": version, "epoch": epoch}
            self._audit(conn, actor, "activate", details)
            return activated

    def revoke(
        self, adapter_id: str, version: int, *, reason: str = "", actor: str = "system"
    ) -> AdapterVersion:
        """Stop serving an active version; bumps the epoch."""
        with self._write() as conn:
            revoked = self._move(conn, adapter_id, version, AdapterStatus.REVOKED)
            epoch = self._bump_epoch(conn)
            details = {"id": adapter_id, "version": version, "epoch": epoch, "reason": reason}
            self._audit(conn, actor, "revoke", details)
            return revoked

    def fail(
        self, adapter_id: str, version: int, *, reason: str = "", actor: str = "system"
    ) -> AdapterVersion:
        """Mark a training version failed (its run died or was cancelled)."""
        with self._write() as conn:
            failed = self._move(conn, adapter_id, version, AdapterStatus.FAILED)
            self._audit(
                conn, actor, "fail", {"id": adapter_id, "version": version, "reason": reason}
            )
            return failed

    def purge(self, adapter_id: str, version: int, *, actor: str = "system") -> AdapterVersion:
        """Mark a revoked or failed version purged, once its files are deleted."""
        with self._write() as conn:
            purged = self._move(conn, adapter_id, version, AdapterStatus.PURGED)
            self._audit(conn, actor, "purge", {"id": adapter_id, "version": version})
            return purged

    # -- adapter versions: queries -------------------------------------------------------

    def epoch(self) -> int:
        """The current epoch: bumped with every change to the set of active versions."""
        with self._lock:
            return int(self._meta(self._conn, "epoch"))

    def get_version(self, adapter_id: str, version: int) -> AdapterVersion:
        """One version; NotFound if it does not exist."""
        with self._lock:
            return self._version(self._conn, adapter_id, version)

    def list_versions(
        self, adapter_id: str | None = None, statuses: Iterable[str] | None = None
    ) -> list[AdapterVersion]:
        """Versions sorted by (id, version), optionally of one adapter and/or some statuses."""
        wanted = None if statuses is None else [self._status(s).value for s in statuses]
        sql = _VERSION_SELECT + " WHERE (?1 IS NULL OR v.adapter_id = ?1)"
        sql += " AND (?2 IS NULL OR v.status IN (SELECT value FROM json_each(?2)))"
        params = (adapter_id, None if wanted is None else json.dumps(wanted))
        with self._lock:
            rows = self._conn.execute(sql + _VERSION_ORDER, params).fetchall()
        return [_version_from_row(r) for r in rows]

    def active_adapters(self, groups: Iterable[str]) -> list[AdapterVersion]:
        """The active version of every adapter whose group is in ``groups``, sorted by id."""
        sql = _VERSION_SELECT + (
            " WHERE v.status = 'active' AND a.grp IN (SELECT value FROM json_each(?))"
        )
        with self._lock:
            rows = self._conn.execute(sql + _VERSION_ORDER, (json.dumps(list(groups)),))
            return [_version_from_row(r) for r in rows.fetchall()]

    def active_snapshot(self) -> tuple[int, list[AdapterVersion]]:
        """The epoch and every active version, read in one snapshot (what a replica syncs to)."""
        sql = _VERSION_SELECT + " WHERE v.status = 'active'" + _VERSION_ORDER
        with self._read() as conn:
            epoch = int(self._meta(conn, "epoch"))
            rows = conn.execute(sql).fetchall()
        return epoch, [_version_from_row(r) for r in rows]

    def versions_containing(
        self, doc_id: str, content_hash: str | None = None
    ) -> list[AdapterVersion]:
        """Every version (any status) whose lineage includes ``doc_id``; with ``content_hash``,
        only those that saw that content (or whose lineage does not say which content)."""
        with self._read() as conn:
            return self._versions_containing(conn, doc_id, content_hash)

    @staticmethod
    def _versions_containing(
        conn: sqlite3.Connection, doc_id: str, content_hash: str | None = None
    ) -> list[AdapterVersion]:
        sql = _VERSION_SELECT + (
            " JOIN lineage l ON l.adapter_id = v.adapter_id AND l.version = v.version"
            " WHERE l.doc_id = ?1 AND (?2 IS NULL OR l.content_hash IS NULL"
            " OR l.content_hash = ?2)"
        )
        rows = conn.execute(sql + _VERSION_ORDER, (doc_id, content_hash))
        return [_version_from_row(r) for r in rows]

    def lineage(self, adapter_id: str, version: int) -> list[str]:
        """The sorted doc ids a version was trained on."""
        return sorted(self.lineage_hashes(adapter_id, version))

    def lineage_hashes(self, adapter_id: str, version: int) -> dict[str, str | None]:
        """Doc id -> the content hash the version saw (None: not recorded)."""
        with self._read() as conn:
            self._version(conn, adapter_id, version)
            rows = conn.execute(
                "SELECT doc_id, content_hash FROM lineage WHERE adapter_id = ? AND version = ? "
                "ORDER BY doc_id",
                (adapter_id, version),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def manifest(self, adapter_id: str, version: int) -> dict[str, Any] | None:
        """The manifest given at registration, or None."""
        with self._read() as conn:
            self._version(conn, adapter_id, version)
            raw = conn.execute(
                "SELECT manifest FROM versions WHERE adapter_id = ? AND version = ?",
                (adapter_id, version),
            ).fetchone()[0]
        return None if raw is None else json.loads(raw)

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
                epoch=int(self._meta(conn, "epoch")),
                adapters=conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0],
                versions_by_status=by_status,
                active_keys=total - revoked,
                revoked_keys=revoked,
                last_audit_seq=conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[
                    0
                ],
            )

    @staticmethod
    def _status(value: str) -> AdapterStatus:
        try:
            return AdapterStatus(value)
        except ValueError:
            known = ", ".join(s.value for s in AdapterStatus)
            raise InvalidArgument(f"statuses: got {value!r}; use some of {known}") from None

    # -- API keys ------------------------------------------------------------------------

    def create_key(
        self, user: str, groups: Iterable[str], *, admin: bool = False, actor: str = "system"
    ) -> tuple[str, KeyRecord]:
        """Create a key; return its plaintext (shown once, never stored) and its record."""
        user = keys.validate_user(user)
        checked = keys.validate_groups(groups)
        key_id, secret, plaintext = keys.generate_key()
        salt = keys.new_salt()
        with self._write() as conn:
            hashed = keys.hash_secret(secret, salt)
            values = (key_id, salt, hashed, user, json.dumps(checked), int(admin), _now())
            conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, NULL)", values)
            details = {"key_id": key_id, "user": user, "groups": list(checked), "admin": admin}
            self._audit(conn, actor, "create_key", details)
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return plaintext, _key_from_row(row)

    def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, by creation time. No hashes, no secrets."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
        return [_key_from_row(r) for r in rows]

    def revoke_key(self, key_id: str, *, actor: str = "system") -> KeyRecord:
        """Revoke a key. Revoking a revoked key changes nothing and returns its record."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (_now(), key_id),
            ).rowcount
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"key_id: no key {key_id!r}; `adapterswap keys list` shows them")
            if changed:
                self._audit(conn, actor, "revoke_key", {"key_id": key_id})
        return _key_from_row(row)

    def lookup_key(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for unknown, malformed or revoked."""
        parts = keys.split_key(key)
        if parts is None:
            return None
        key_id, secret = parts
        with self._lock:
            row = self._conn.execute(
                "SELECT salt, hash, user, groups, admin, revoked_at FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        salt, expected = (row["salt"], row["hash"]) if row else (_DUMMY_SALT, _DUMMY_HASH)
        if not keys.verify_secret(secret, salt, expected) or row is None or row["revoked_at"]:
            return None
        groups = tuple(json.loads(row["groups"]))
        return Principal(key_id=key_id, user=row["user"], groups=groups, admin=bool(row["admin"]))

    # -- deletions -----------------------------------------------------------------------

    def begin_delete(
        self,
        doc_ids: Iterable[str],
        runner: str,
        *,
        actor: str = "system",
        content_hashes: Mapping[str, str | Iterable[str]] | None = None,
        shards: Mapping[str, Iterable[str]] | None = None,
        job_id: str | None = None,
    ) -> tuple[JobRecord | None, list[DeletionRecord]]:
        """Delete documents, in ONE transaction: revoke, fail, record, epoch, job.

        For every id, EVERY active version whose lineage holds it is revoked and every
        training one failed, whatever earlier deletions of the id are still unfinished, and
        the epoch moves once if anything was revoked. ``content_hashes`` gives the contents
        the catalog holds for an id (``shards`` where they are): each one no ``deleting``
        record covers (see ``covers_row``) gets a new one; an id given no content gets one
        for "any content" (None) unless it already has unfinished deletions. A deletion job is
        created (or ``job_id``, a pending one of the same request, reused) when anything
        changed, or when an unfinished deletion's job has ended (it was interrupted): the new
        job carries it on. Returns (that job, or None when the running job carries
        everything; the records covering the request, by id).
        """
        docs = sorted(set(doc_ids))
        given = {d: _as_list((content_hashes or {}).get(d)) for d in docs}
        with self._write() as conn:
            now, todo = _now(), []
            for doc_id in docs:
                unfinished = self._unfinished(conn, doc_id)
                hashes = given[doc_id]
                fresh = [h for h in hashes if not any(covers_row(r, h) for r in unfinished)]
                if not hashes and not unfinished:
                    fresh = [None]
                covering = [
                    r for r in unfinished if not hashes or any(covers_row(r, h) for h in hashes)
                ]
                holders = [
                    v
                    for v in self._versions_containing(conn, doc_id)
                    if v.status in (AdapterStatus.ACTIVE, AdapterStatus.TRAINING)
                ]
                todo.append((doc_id, fresh, covering, holders))
            revoking = any(v.status == AdapterStatus.ACTIVE for *_, held in todo for v in held)
            changed = revoking or any(fresh or held for _, fresh, _, held in todo)
            orphaned = {
                r.job_id
                for _, _, covering, _ in todo
                for r in covering
                if self._job(conn, r.job_id).finished
            }
            if not changed and not orphaned:
                for doc_id, _, covering, _ in todo:
                    details = {"doc_id": doc_id, "job_id": covering[0].job_id, "repeat": True}
                    self._audit(conn, actor, "delete_requested", details | {"revoked": []})
                return None, [r for *_, covering, _ in todo for r in covering]
            job = self._job(conn, job_id) if job_id is not None else None
            if job is None or job.finished or job.kind != "delete":
                job = self._insert_job(conn, "delete", runner, actor)
            epoch = self._bump_epoch(conn) if revoking else int(self._meta(conn, "epoch"))
            records = []
            for doc_id, fresh, covering, holders in todo:
                revoked = self._revoke_holders(conn, holders, epoch, actor, f"delete {doc_id}")
                ids = [r.deletion_id for r in covering]
                for content_hash in fresh:
                    ids.append(
                        self._insert_deletion(
                            conn, doc_id, content_hash, job, actor, epoch, revoked, shards, now
                        )
                    )
                for record in covering:  # what this request revoked is theirs too
                    if revoked:
                        merged = sorted({(r.id, r.version) for r in (*record.revoked, *revoked)})
                        conn.execute(
                            "UPDATE deletions SET revoked = ?, epoch = ?, updated_at = ? "
                            "WHERE deletion_id = ?",
                            (json.dumps(merged), epoch, now, record.deletion_id),
                        )
                    if record.job_id in orphaned:  # its job ended unfinished: this one goes on
                        conn.execute(
                            "UPDATE deletions SET job_id = ?, updated_at = ? WHERE deletion_id = ?",
                            (job.job_id, now, record.deletion_id),
                        )
                details = {"doc_id": doc_id, "job_id": job.job_id, "epoch": epoch}
                details |= {"revoked": [f"{r.id}@v{r.version}" for r in revoked]}
                details |= {"content_hashes": fresh} if fresh else {"repeat": True}
                self._audit(conn, actor, "delete_requested", details)
                records += [self._deletion_by_id(conn, i) for i in ids]
            return job, records

    def _revoke_holders(
        self,
        conn: sqlite3.Connection,
        holders: list[AdapterVersion],
        epoch: int,
        actor: str,
        reason: str,
    ) -> list[AdapterRef]:
        """Revoke the active versions among ``holders`` and fail the training ones."""
        revoked = []
        for version in holders:
            current = self._version(conn, version.adapter_id, version.version)
            details = {"id": version.adapter_id, "version": version.version, "reason": reason}
            if current.status == AdapterStatus.ACTIVE:
                self._move(conn, version.adapter_id, version.version, AdapterStatus.REVOKED)
                revoked.append(version.ref)
                self._audit(conn, actor, "revoke", details | {"epoch": epoch})
            elif current.status == AdapterStatus.TRAINING:
                self._move(conn, version.adapter_id, version.version, AdapterStatus.FAILED)
                self._audit(conn, actor, "fail", details)
        return revoked

    def _insert_deletion(
        self,
        conn: sqlite3.Connection,
        doc_id: str,
        content_hash: str | None,
        job: JobRecord,
        actor: str,
        epoch: int,
        revoked: list[AdapterRef],
        shards: Mapping[str, Iterable[str]] | None,
        now: str,
    ) -> int:
        held = None if shards is None or doc_id not in shards else sorted(set(shards[doc_id]))
        cur = conn.execute(
            "INSERT INTO deletions (doc_id, content_hash, state, job_id, actor, epoch, revoked, "
            "shards, requested_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                doc_id,
                content_hash,
                DeletionState.DELETING.value,
                job.job_id,
                actor,
                epoch,
                json.dumps([[r.id, r.version] for r in revoked]),
                None if held is None else json.dumps(held),
                now,
                now,
            ),
        )
        return int(cur.lastrowid)

    def advance_deletion(
        self,
        deletions: Iterable[DeletionRecord | int],
        state: DeletionState,
        *,
        actor: str = "system",
        **details: Any,
    ) -> list[DeletionRecord]:
        """Move deletions (records or ids) forward to ``state``; those there or beyond stay."""
        state = DeletionState(state)
        wanted = {d.deletion_id if isinstance(d, DeletionRecord) else int(d) for d in deletions}
        with self._write() as conn:
            moved = []
            for deletion_id in sorted(wanted):
                current = self._deletion_by_id(conn, deletion_id)
                if _DELETION_ORDER.index(current.state) >= _DELETION_ORDER.index(state):
                    continue
                conn.execute(
                    "UPDATE deletions SET state = ?, updated_at = ? WHERE deletion_id = ?",
                    (state.value, _now(), deletion_id),
                )
                keys = {"doc_id": current.doc_id, "content_hash": current.content_hash}
                self._audit(conn, actor, f"delete_{state.value}", keys | details)
                moved.append(self._deletion_by_id(conn, deletion_id))
            return moved

    def deletion(self, doc_id: str) -> DeletionRecord:
        """The latest deletion of ``doc_id``; NotFound if it was never deleted."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM deletions WHERE doc_id = ? ORDER BY deletion_id DESC LIMIT 1",
                (doc_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"document {doc_id!r} has no deletion")
        return _deletion_from_row(row)

    def deletions(self, doc_id: str | None = None) -> list[DeletionRecord]:
        """Every deletion (of ``doc_id``, if given), finished or not, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM deletions WHERE ?1 IS NULL OR doc_id = ?1 ORDER BY deletion_id",
                (doc_id,),
            ).fetchall()
        return [_deletion_from_row(r) for r in rows]

    def unfinished_deletions(self) -> list[DeletionRecord]:
        """Deletions not yet purged, oldest first: the work a delete job (re)does."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM deletions WHERE state != 'purged' ORDER BY deletion_id"
            ).fetchall()
        return [_deletion_from_row(r) for r in rows]

    @staticmethod
    def _unfinished(conn: sqlite3.Connection, doc_id: str) -> list[DeletionRecord]:
        rows = conn.execute(
            "SELECT * FROM deletions WHERE doc_id = ? AND state != 'purged' ORDER BY deletion_id",
            (doc_id,),
        ).fetchall()
        return [_deletion_from_row(r) for r in rows]

    @staticmethod
    def _deletion_by_id(conn: sqlite3.Connection, deletion_id: int) -> DeletionRecord:
        row = conn.execute(
            "SELECT * FROM deletions WHERE deletion_id = ?", (deletion_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no deletion {deletion_id}")
        return _deletion_from_row(row)

    # -- serving replicas' acknowledged epochs ---------------------------------------------

    def ack_epoch(self, replica_id: str, epoch: int) -> None:
        """A serving replica has dropped everything revoked up to ``epoch`` (and is alive)."""
        with self._write() as conn:  # never lowered: a late, older acknowledgement only says alive
            conn.execute(
                "INSERT INTO replicas VALUES (?, ?, ?) ON CONFLICT (replica_id) DO UPDATE SET "
                "epoch = MAX(epoch, excluded.epoch), seen_at = excluded.seen_at",
                (replica_id, epoch, time.time()),
            )

    def forget_replica(self, replica_id: str) -> None:
        """A replica that shut down: no delete waits for it."""
        with self._write() as conn:
            conn.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

    def live_replicas(self, live_within_s: float) -> list[tuple[str, int, float]]:
        """(replica, acknowledged epoch, last seen as Unix time) of replicas seen in the window."""
        since = time.time() - live_within_s
        with self._read() as conn:
            rows = conn.execute(
                "SELECT replica_id, epoch, seen_at FROM replicas WHERE seen_at >= ? "
                "ORDER BY replica_id",
                (since,),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def replicas_behind(self, epoch: int, live_within_s: float) -> list[tuple[str, int]]:
        """(replica, acknowledged epoch) of live replicas (seen within the window) below it."""
        return [(r, e) for r, e, _ in self.live_replicas(live_within_s) if e < epoch]

    # -- jobs ----------------------------------------------------------------------------

    def create_job(self, kind: str, runner: str, *, actor: str = "system") -> JobRecord:
        """Record a new ``pending`` job; its id is ``<kind>-<12 hex digits>``."""
        with self._write() as conn:
            return self._insert_job(conn, kind, runner, actor)

    def _insert_job(
        self, conn: sqlite3.Connection, kind: str, runner: str, actor: str
    ) -> JobRecord:
        job_id = f"{kind}-{uuid.uuid4().hex[:12]}"
        now = _now()
        conn.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, '{}', NULL, NULL)",
            (job_id, kind, JobState.PENDING.value, runner, actor, now, now),
        )
        self._audit(conn, actor, "submit_job", {"job_id": job_id, "kind": kind})
        return self._job(conn, job_id)

    def update_job(
        self,
        job_id: str,
        state: JobState,
        *,
        progress: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        actor: str = "system",
    ) -> JobRecord:
        """Move a job to ``state`` (running again: a progress update); audits the end."""
        state = JobState(state)
        with self._write() as conn:
            current = self._job(conn, job_id)
            if current.state not in _JOB_FROM[state]:
                raise IllegalTransition(
                    f"job {job_id} is {current.state}; it cannot become {state}"
                )
            conn.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, progress = ?, result = ?, error = ? "
                "WHERE job_id = ?",
                (
                    state.value,
                    _now(),
                    json.dumps(current.progress if progress is None else progress),
                    None if result is None else json.dumps(result),
                    error,
                    job_id,
                ),
            )
            if state in (JobState.SUCCEEDED, JobState.FAILED):
                details = {"job_id": job_id, "kind": current.kind, "state": state.value}
                self._audit(
                    conn, actor, "finish_job", details | ({"error": error} if error else {})
                )
            return self._job(conn, job_id)

    def get_job(self, job_id: str) -> JobRecord:
        with self._read() as conn:
            return self._job(conn, job_id)

    def list_jobs(self, states: Iterable[str] | None = None, limit: int = 100) -> list[JobRecord]:
        """Jobs, newest first, optionally only in ``states``."""
        wanted = [JobState(s).value for s in states] if states is not None else list(JobState)
        marks = ", ".join("?" * len(wanted))
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at DESC LIMIT ?",
                (*wanted, limit),
            ).fetchall()
        return [_job_from_row(r) for r in rows]

    @staticmethod
    def _job(conn: sqlite3.Connection, job_id: str) -> JobRecord:
        row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job_id: no job {job_id!r}")
        return _job_from_row(row)

    # -- audit log -----------------------------------------------------------------------

    def append_audit(self, actor: str, action: str, **details: Any) -> int:
        """Append one audit row (details must be JSON-serialisable); return its seq."""
        with self._write() as conn:
            return self._audit(conn, actor, action, details)

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
