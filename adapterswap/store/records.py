"""The store's records as its callers see them: jobs, deletions, keys, audit rows, the summary,
their state enums, and the converters from a SQLite row to each.

Plain values only: the SQL that writes and reads them lives with the registry's tables
(``registry.py`` and the ``*_records.py`` mixins). Adapter references and versions are
shared by every stage, so they live in :mod:`adapterswap.types`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from adapterswap.types import AdapterRef, AdapterStatus, AdapterVersion


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


def job_from_row(row: sqlite3.Row) -> JobRecord:
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


def deletion_from_row(row: sqlite3.Row) -> DeletionRecord:
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


@dataclass(frozen=True)
class KeyRecord:
    """A stored key as ``keys list`` shows it: never the secret, never the hash."""

    key_id: str
    user: str
    groups: tuple[str, ...]
    admin: bool
    created_at: str
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def timestamp() -> str:
    """Now, as the store writes every time: ISO-8601 UTC with microseconds (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def version_from_row(row: sqlite3.Row) -> AdapterVersion:
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


def key_from_row(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        user=row["user"],
        groups=tuple(json.loads(row["groups"])),
        admin=bool(row["admin"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
