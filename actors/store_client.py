"""The typed client of the AdapterStore actor: :class:`StoreClient`.

Every Ray-side caller of the store (the Serve deployments, the job runners) goes through it.
It satisfies :class:`adapterswap.store.protocol.Store`, as the plain registry does, so the
library code it is handed cannot tell the two apart, except by the deadlines:

- every call has one, ``serve.store_timeout_s``; past it the call raises StoreUnavailable
  (HTTP 503, Retry-After), never hangs;
- a read (:class:`~adapterswap.store.protocol.StoreReads`) is pure, so it is sent again
  across a store restart until its deadline;
- a write is sent once and never again: one in flight when the store died may have
  committed, and a second ``begin_delete`` or ``create_job`` would not be a no-op;
- a remote error is raised as itself, out of Ray's wrapper (whose text shows tracebacks
  and addresses).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from actors.adapter_store import get_or_create_store
from adapterswap.config import AdapterSwapConfig, ServeSettings
from adapterswap.errors import StoreUnavailable, unwrap_remote
from adapterswap.store.records import (
    AuditEntry,
    DeletionRecord,
    DeletionState,
    JobRecord,
    JobState,
    KeyRecord,
)
from adapterswap.types import ActiveChanges, AdapterVersion, Principal

# For callers that do not pass their config's deadline.
DEFAULT_STORE_TIMEOUT_S: float = ServeSettings.model_fields["store_timeout_s"].default
# The store restarting: measured on Ray 2.60, a call submitted meanwhile fails at once.
_RESTARTING = (ActorUnavailableError, RayActorError)


class StoreClient:
    """The store actor's methods as synchronous calls with a deadline (see the module)."""

    def __init__(self, actor: ActorHandle, timeout_s: float = DEFAULT_STORE_TIMEOUT_S) -> None:
        self._actor = actor
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, config: AdapterSwapConfig) -> StoreClient:
        """The client of ``config``'s store (started on the head node if absent)."""
        return cls(get_or_create_store(config), config.serve.store_timeout_s)

    # -- reads: retried until the deadline ----------------------------------------------

    def epoch(self) -> int:
        return self._read("epoch")

    def active_snapshot(self) -> tuple[int, list[AdapterVersion]]:
        return self._read("active_snapshot")

    def active_changes(self, since_epoch: int) -> ActiveChanges | None:
        return self._read("active_changes", since_epoch)

    def versions_containing(
        self, doc_id: str, content_hash: str | None = None
    ) -> list[AdapterVersion]:
        return self._read("versions_containing", doc_id, content_hash)

    def lookup_key(self, key: str) -> Principal | None:
        return self._read("lookup_key", key)

    def list_keys(self) -> list[KeyRecord]:
        return self._read("list_keys")

    def deletions(self, doc_id: str | None = None) -> list[DeletionRecord]:
        return self._read("deletions", doc_id)

    def unfinished_deletions(self) -> list[DeletionRecord]:
        return self._read("unfinished_deletions")

    def live_replicas(self, live_within_s: float) -> list[tuple[str, int, float]]:
        return self._read("live_replicas", live_within_s)

    def get_job(self, job_id: str) -> JobRecord:
        return self._read("get_job", job_id)

    def audit_log(self, since_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        return self._read("audit_log", since_seq, limit)

    # -- writes: sent once ----------------------------------------------------------------

    def ack_epoch(self, replica_id: str, epoch: int, detail: dict[str, Any] | None = None) -> None:
        self._write("ack_epoch", replica_id, epoch, detail)

    def forget_replica(self, replica_id: str) -> None:
        self._write("forget_replica", replica_id)

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
        return self._write(
            "begin_delete",
            list(doc_ids),
            runner,
            actor=actor,
            content_hashes=content_hashes,
            shards=shards,
            job_id=job_id,
        )

    def advance_deletion(
        self,
        deletions: Iterable[DeletionRecord | int],
        state: DeletionState,
        *,
        actor: str = "system",
        **details: Any,
    ) -> list[DeletionRecord]:
        return self._write("advance_deletion", list(deletions), state, actor=actor, **details)

    def append_audit(self, actor: str, action: str, **details: Any) -> int:
        return self._write("append_audit", actor, action, **details)

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        return self._write("acquire_lease", name, owner, ttl_s)

    def renew_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        return self._write("renew_lease", name, owner, ttl_s)

    def release_lease(self, name: str, owner: str) -> None:
        self._write("release_lease", name, owner)

    def create_job(self, kind: str, runner: str, *, actor: str = "system") -> JobRecord:
        return self._write("create_job", kind, runner, actor=actor)

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
        return self._write(
            "update_job",
            job_id,
            state,
            progress=progress,
            result=result,
            error=error,
            actor=actor,
        )

    # -- the two ways of calling -----------------------------------------------------------

    def _read(self, method: str, *args: Any) -> Any:
        """Sent again across a store restart until the deadline, then StoreUnavailable."""
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ref = getattr(self._actor, method).options(max_task_retries=-1).remote(*args)
            try:
                return ray.get(ref, timeout=left)
            except GetTimeoutError:
                ray.cancel(ref)  # a read: dropping it from the store's queue is harmless
                break
            except _RESTARTING:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            except RayTaskError as exc:
                raise unwrap_remote(exc) from exc
        raise self._late(write=False)

    def _write(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Sent once, waited for until the deadline, never sent again."""
        ref = getattr(self._actor, method).remote(*args, **kwargs)
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except (GetTimeoutError, *_RESTARTING):
            raise self._late(write=True) from None
        except RayTaskError as exc:
            raise unwrap_remote(exc) from exc

    def _late(self, write: bool) -> StoreUnavailable:
        maybe = "; the change may or may not have been made" if write else ""
        return StoreUnavailable(
            f"the adapter store did not answer within serve.store_timeout_s={self.timeout_s:g} s"
            f"{maybe}: retry the request"
        )
