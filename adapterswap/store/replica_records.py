"""The epochs serving replicas acknowledge, so a delete can wait until every live replica
has dropped the versions it revoked (``replicas_behind``).

A replica acknowledges an epoch (``ack_epoch``) each time it syncs; the acknowledgement is
never lowered, and the time it was seen says whether the replica is still alive. Mixed into
:class:`~adapterswap.store.registry.AdapterRegistry`, which provides the transactions.
"""

from __future__ import annotations

import time

from adapterswap.store.core import Transactions


class ReplicaRecords:
    """Record and read serving replicas' acknowledged epochs (each call is one transaction)."""

    def ack_epoch(self: Transactions, replica_id: str, epoch: int) -> None:
        """A serving replica has dropped everything revoked up to ``epoch`` (and is alive)."""
        with self._write() as conn:  # never lowered: a late, older acknowledgement only says alive
            conn.execute(
                "INSERT INTO replicas (replica_id, epoch, seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT (replica_id) DO UPDATE SET "
                "epoch = MAX(epoch, excluded.epoch), seen_at = excluded.seen_at",
                (replica_id, epoch, time.time()),
            )

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
