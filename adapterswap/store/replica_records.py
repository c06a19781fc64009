"""The epochs serving replicas acknowledge, so a delete can wait until every live replica
has dropped the versions it revoked (``replicas_behind``).

A replica acknowledges an epoch (``ack_epoch``) each time it syncs; the acknowledgement is
never lowered, and the time it was seen says whether the replica is still alive. With it the
replica may report what operators should see (``detail``, JSON: the adapters it failed to
load), which ``adapterswap status`` prints (``replica_details``). Mixed into
:class:`~adapterswap.store.registry.AdapterRegistry`, which provides the transactions.
"""

from __future__ import annotations

import json
import time
from typing import Any

from adapterswap.store.core import Transactions


class ReplicaRecords:
    """Record and read serving replicas' acknowledged epochs (each call is one transaction)."""

    def ack_epoch(
        self: Transactions, replica_id: str, epoch: int, detail: dict[str, Any] | None = None
    ) -> None:
        """A serving replica has dropped everything revoked up to ``epoch`` (and is alive);
        ``detail`` replaces its last report (None: it reports nothing)."""
        report = None if detail is None else json.dumps(detail, sort_keys=True)
        with self._write() as conn:  # never lowered: a late, older acknowledgement only says alive
            conn.execute(
                "INSERT INTO replicas (replica_id, epoch, seen_at, detail) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (replica_id) DO UPDATE SET epoch = MAX(epoch, excluded.epoch), "
                "seen_at = excluded.seen_at, detail = excluded.detail",
                (replica_id, epoch, time.time(), report),
            )

    def replica_details(self: Transactions, live_within_s: float) -> dict[str, dict[str, Any]]:
        """The last report of each replica seen in the window that sent one, by replica."""
        since = time.time() - live_within_s
        with self._read() as conn:
            rows = conn.execute(
                "SELECT replica_id, detail FROM replicas WHERE seen_at >= ? AND detail IS NOT NULL",
                (since,),
            ).fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def forget_replica(self: Transactions, replica_id: str) -> None:
        """A replica that shut down: no delete waits for it."""
        with self._write() as conn:
            conn.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

    def live_replicas(self: Transactions, live_within_s: float) -> list[tuple[str, int, float]]:
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
