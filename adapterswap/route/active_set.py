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

With thousands of versions a replica that holds an epoch reads only what changed since
(``changes``, the store's ``active_changes``): the versions that left the set and those that
entered it, with the new epoch, read in one snapshot. A delta is applied the same way (new
set, evictions, epoch) and only if it is newer than the view; it is valid on any view from
its ``since`` onwards, because it gives each changed version's state at its epoch, so a
delta read from an epoch that a concurrent sync has since moved past still lands on exactly
the store's set. When the store cannot give a delta (the view holds none yet, or its epoch
is from before the store's migration), the whole snapshot is read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from adapterswap.errors import NotFound
from adapterswap.types import ActiveChanges, AdapterRef, AdapterVersion

Snapshot = Callable[[], tuple[int, list[AdapterVersion]]]
Changes = Callable[[int], ActiveChanges | None]


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
        changes: Changes | None = None,
    ) -> None:
        """``snapshot`` reads the store; ``on_drop(keep)`` evicts everything not in ``keep``.

        ``epoch``, if given, reads the store's epoch alone: a sync that finds it unchanged
        (the common case, once per request or batch) transfers nothing else. ``changes``, if
        given, reads the delta since an epoch (``Store.active_changes``), so a view that
        holds an epoch transfers only what changed.
        """
        self._snapshot = snapshot
        self._on_drop = on_drop
        self._epoch = epoch
        self._changes = changes
        self._by_id: dict[str, AdapterVersion] = {}
        self._by_group: dict[str, dict[str, AdapterVersion]] = {}  # group -> id -> version
        self._sorted: dict[str, list[AdapterVersion]] = {}  # a group's, by id, until it changes
        self.epoch = -1
        self._lock = threading.Lock()

    def sync(self) -> SyncResult:
        """Catch up with the store; returns the epoch now held and what was dropped.

        Never applies a snapshot older than (or as old as) the one held: the epoch returned
        never goes down, whatever order concurrent syncs' reads come back in.
        """
        held = self.epoch
        if self._epoch is not None and self._epoch() <= held:
            return SyncResult(held, ())  # the epoch moves with every change to the set
        delta = self._changes(held) if self._changes is not None and held >= 0 else None
        if delta is not None:
            return self._apply(delta.epoch, delta.removed, delta.added, whole=False)
        epoch, versions = self._snapshot()
        return self._apply(epoch, (), versions, whole=True)

    def _apply(
        self,
        epoch: int,
        removed: Iterable[AdapterRef],
        added: Iterable[AdapterVersion],
        *,
        whole: bool,
    ) -> SyncResult:
        """Apply a snapshot (``whole``: ``added`` is the entire set) or a delta, if newer."""
        with self._lock:
            if epoch <= self.epoch:  # as old as the view or older: a read that lost a race
                return SyncResult(self.epoch, ())
            # The new set first, then evictions, then the epoch: a decode loop that sees the
            # new epoch (an int read, no lock) finds at least this set in refs().
            if whole:
                self._by_id, self._by_group, self._sorted = {}, {}, {}
            for ref in removed:
                held = self._by_id.get(ref.id)
                if held is not None and held.ref == ref:
                    self._remove(held)
            for version in added:
                held = self._by_id.get(version.adapter_id)
                if held is not None:
                    self._remove(held)
                self._by_id[version.adapter_id] = version
                self._by_group.setdefault(version.group, {})[version.adapter_id] = version
                self._sorted.pop(version.group, None)
            dropped = self._on_drop({v.ref for v in self._by_id.values()})
            self.epoch = epoch
            return SyncResult(epoch, tuple(dropped))

    def _remove(self, version: AdapterVersion) -> None:
        """Take ``version`` out of the view (under the lock)."""
        del self._by_id[version.adapter_id]
        del self._by_group[version.group][version.adapter_id]
        self._sorted.pop(version.group, None)

    def refs(self) -> set[AdapterRef]:
        """Every active version in this view, whatever its group (for the model replica)."""
        with self._lock:
            return {v.ref for v in self._by_id.values()}

    def visible(self, groups: Iterable[str]) -> list[AdapterVersion]:
        """Active versions of ``groups`` only, sorted by id."""
        runs = []
        with self._lock:  # only the caller's groups are read, each sorted once per change
            for group in set(groups):
                if group not in self._sorted:
                    held = self._by_group.get(group, {})
                    self._sorted[group] = [held[i] for i in sorted(held)]
                runs.append(self._sorted[group])
        if len(runs) == 1:
            return list(runs[0])
        return sorted((v for run in runs for v in run), key=lambda v: v.adapter_id)

    def resolve(self, adapter_id: str, groups: Iterable[str]) -> AdapterVersion:
        """The active version of ``adapter_id`` if the caller's groups may see it.

        An adapter of another group answers exactly like one that does not exist.
        """
        with self._lock:
            version = self._by_id.get(adapter_id)
        if version is None or version.group not in set(groups):
            raise NotFound(f"adapter {adapter_id!r} not found")
        return version
