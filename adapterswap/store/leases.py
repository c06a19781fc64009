"""Named leases in the store: the locks that serialise ingest, training and deletion.

A file lock only holds on one host, and on a cluster the ingress that ingests and the job
runner that deletes may run on different nodes. A lease lives in the store instead, which
every node reaches: one row per name with its owner and an expiry on the store's own clock
(one clock for everyone). An owner renews its lease while it works; if it dies, the lease
expires and the next owner takes it. Mixed into :class:`~adapterswap.store.registry.AdapterRegistry`,
so the store actor answers these calls; :func:`adapterswap.store.locks.exclusive` is the client.
"""

from __future__ import annotations

import time

from adapterswap.store.core import Transactions


class LeaseRecords:
    """Acquire, renew and release named leases (each call is one transaction)."""

    def acquire_lease(self: Transactions, name: str, owner: str, ttl_s: float) -> bool:
        """Take ``name`` for ``owner`` until ``ttl_s`` from now, unless another owner holds it."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT owner, expires_at FROM leases WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, owner, now + ttl_s)
            )
            return True

    def renew_lease(self: Transactions, name: str, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s unexpired lease; False if it expired or another owner holds it."""
        now = time.time()
        with self._write() as conn:
            return bool(
                conn.execute(
                    "UPDATE leases SET expires_at = ? WHERE name = ? AND owner = ? "
                    "AND expires_at > ?",
                    (now + ttl_s, name, owner, now),
                ).rowcount
            )

    def release_lease(self: Transactions, name: str, owner: str) -> None:
        """Give ``name`` up, if ``owner`` still holds it."""
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))
