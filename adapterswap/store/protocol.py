"""What serving, jobs and deletion call on the store: the :class:`Store` protocol. No Ray here.

Two things satisfy it: the plain :class:`~adapterswap.store.registry.AdapterRegistry` (one
process, tests, the CLI on the home), and :class:`actors.store_client.StoreClient`, the typed
client of the AdapterStore actor (Serve replicas, job runners). Library code is written
against this protocol and handed either.

The methods are split the way the actor's client treats them: reads are pure, so a read
may be sent again across a store restart; writes are sent once, since one in flight when
the store died may have committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from adapterswap.store.records import (
    AuditEntry,
    DeletionRecord,
    DeletionState,
    JobRecord,
    JobState,
    KeyRecord,
)
from adapterswap.types import ActiveChanges, AdapterVersion, Principal


class StoreReads(Protocol):
    """The store's pure reads that the serving path and the jobs use."""

    def epoch(self) -> int:
        """The revocation epoch: it moves whenever the set of servable versions shrinks."""
        ...

    def active_snapshot(self) -> tuple[int, list[AdapterVersion]]:
        """The epoch and every active version, read together."""
        ...

    def active_changes(self, since_epoch: int) -> ActiveChanges | None:
        """What entered and left the active set after ``since_epoch``, with the epoch, read
        together; None when the store cannot say (read ``active_snapshot`` instead)."""
        ...

    def versions_containing(
        self, doc_id: str, content_hash: str | None = None
    ) -> list[AdapterVersion]:
        """Versions whose lineage holds ``doc_id`` (with that content, if given)."""
        ...

    def lookup_key(self, key: str) -> Principal | None:
        """The principal of an unrevoked key; None for an unknown or revoked one."""
        ...

    def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked or not (never a secret)."""
        ...

    def deletions(self, doc_id: str | None = None) -> list[DeletionRecord]:
        """Deletion records, of one document or of all."""
        ...

    def unfinished_deletions(self) -> list[DeletionRecord]:
        """Deletion records not yet purged."""
        ...

    def live_replicas(self, live_within_s: float) -> list[tuple[str, int, float]]:
        """(replica id, acknowledged epoch, seen at) of replicas seen within the window."""
        ...

    def get_job(self, job_id: str) -> JobRecord:
        """One job's row; NotFound if there is none."""
        ...

    def audit_log(self, since_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries after ``since_seq``, oldest first."""
        ...


class StoreWrites(Protocol):
    """The store's writes that the serving path and the jobs use."""

    def ack_epoch(self, replica_id: str, epoch: int, detail: dict[str, Any] | None = None) -> None:
        """A replica's acknowledgement that it serves nothing revoked up to ``epoch``, with
        its report for operators (``detail``, JSON-able; e.g. adapters it failed to load)."""
        ...

    def forget_replica(self, replica_id: str) -> None:
        """Drop a replica from the deletion barrier (it stopped, or Serve reports it dead)."""
        ...

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
        """Record the deletions and revoke every version holding the documents."""
        ...

    def advance_deletion(
        self,
        deletions: Iterable[DeletionRecord | int],
        state: DeletionState,
        *,
        actor: str = "system",
        **details: Any,
    ) -> list[DeletionRecord]:
        """Move deletion records forward to ``state``."""
        ...

    def append_audit(self, actor: str, action: str, **details: Any) -> int:
        """Append one audit entry; returns its sequence number."""
        ...

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the named lease unless another owner holds it."""
        ...

    def renew_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Extend an unexpired lease of ``owner``'s."""
        ...

    def release_lease(self, name: str, owner: str) -> None:
        """Give the named lease up, if ``owner`` still holds it."""
        ...

    def create_job(self, kind: str, runner: str, *, actor: str = "system") -> JobRecord:
        """A new ``pending`` job."""
        ...

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
        """Record a job's state, progress and outcome."""
        ...


class Store(StoreReads, StoreWrites, Protocol):
    """Everything the serving path, the jobs and the deletion barrier call on the store."""
