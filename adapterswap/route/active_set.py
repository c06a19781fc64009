"""A replica's view of the active adapter versions, synced to the store's epoch. No Ray here.

The store moves its epoch with every change to the set of active versions. A replica
``sync``s: it reads (epoch, active versions) in one snapshot, drops every loaded adapter
and cached statistic that is no longer active, and only then records that epoch. Requests
admitted after that see only the new set; generations already running check ``epoch``
before every step and stop the rows whose versions left the set (see ``ModelReplica``), so
once a replica has acknowledged an epoch, no token is produced with a version revoked at or
before it.

The epoch only moves forward: a snapshot older than the one applied (a slow read that lost
a race with a newer one) is ignored, so a view never returns to a revoked version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from adapterswap.errors import NotFound
from adapterswap.types import AdapterRef, AdapterVersion

Snapshot = Callable[[], tuple[int, list[AdapterVersion]]]


@dataclass(frozen=True)
class SyncResult:
    epoch: int
    dropped: tuple[AdapterRef, ...]


class ActiveSet:
    """The active versions a replica may serve, by adapter id, as of an acknowledged epoch."""

    def __init__(
        self,
        snapshot: Snapshot,
        on_drop: Callable[[set[AdapterRef]], list[AdapterRef]],
        epoch: Callable[[], int] | None = None,
    ) -> None:
        """``snapshot`` reads the store; ``on_drop(keep)`` evicts everything not in ``keep``.

        ``epoch``, if given, reads the store's epoch alone: a sync that finds it unchanged
        (the common case, once per request or batch) transfers nothing else.
        """
        self._snapshot = snapshot
        self._on_drop = on_drop
        self._epoch = epoch
        self._by_id: dict[str, AdapterVersion] = {}
        self.epoch = -1
        self._lock = threading.Lock()

    def sync(self) -> SyncResult:
        """Catch up with the store; returns the epoch now held and what was dropped.

        Never applies a snapshot older than (or as old as) the one held: the epoch returned
        never goes down, whatever order concurrent syncs' reads come back in.
        """
        if self._epoch is not None and self._epoch() <= self.epoch:
            return SyncResult(self.epoch, ())  # the epoch moves with every change to the set
        epoch, versions = self._snapshot()
        with self._lock:
            if epoch <= self.epoch:
                return SyncResult(self.epoch, ())
            # The new set first, then evictions, then the epoch: a decode loop that sees the
            # new epoch (an int read, no lock) finds at least this set in refs().
            self._by_id = {v.adapter_id: v for v in versions}
            dropped = self._on_drop({v.ref for v in versions})
            self.epoch = epoch
            return SyncResult(epoch, tuple(dropped))

    def refs(self) -> set[AdapterRef]:
        """Every active version in this view, whatever its group (for the model replica)."""
        with self._lock:
            return {v.ref for v in self._by_id.values()}

    def visible(self, groups: Iterable[str]) -> list[AdapterVersion]:
        """Active versions of ``groups`` only, sorted by id."""
        wanted = set(groups)
        with self._lock:
            return sorted(
                (v for v in self._by_id.values() if v.group in wanted), key=lambda v: v.adapter_id
            )

    def resolve(self, adapter_id: str, groups: Iterable[str]) -> AdapterVersion:
        """The active version of ``adapter_id`` if the caller's groups may see it.

        An adapter of another group answers exactly like one that does not exist.
        """
        with self._lock:
            version = self._by_id.get(adapter_id)
        if version is None or version.group not in set(groups):
            raise NotFound(f"adapter {adapter_id!r} not found")
        return version
