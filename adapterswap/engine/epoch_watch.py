"""A serving replica's acknowledgements of the store's epoch: the deletion barrier. No Ray here.

A model replica syncs before every batch, but an idle one would never notice a revocation,
and a delete must know when every replica has dropped the revoked versions. So each replica
runs an :class:`EpochWatcher`: every ``poll_s`` it syncs (a cheap epoch read when nothing
changed) and, when the acknowledged epoch moved or ``heartbeat_s`` passed, records it in the
store with ``ack_epoch``, with the replica's report for operators (``report()``: e.g. the
adapters it failed to load, which ``adapterswap status`` prints). The epoch ``sync`` returns is one the replica keeps: every version
revoked at or before it is evicted, and the running generation has stopped every row that
used one, so no token is produced with a revoked version after the acknowledgement.

A delete waits until no registered replica is behind its epoch
(``adapterswap.delete.job.wait_for_replicas``). A replica that stops cleanly unregisters at
once; one that dies counts until Ray Serve reports it dead. Missing heartbeats never drop a
replica from the barrier: a slow replica that is alive makes the delete time out (503)
instead. The acknowledged epoch never moves backwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from adapterswap.store.protocol import Store

logger = logging.getLogger("adapterswap.epoch")

# For status displays only: a replica seen within this many heartbeats is shown as live.
# The deletion barrier does not use it (see the module docstring).
LIVE_HEARTBEATS = 3


def live_window_s(heartbeat_s: float) -> float:
    return LIVE_HEARTBEATS * heartbeat_s


class EpochWatcher:
    """Sync and acknowledge in a daemon thread until :meth:`stop`."""

    def __init__(
        self,
        sync: Callable[[], int],
        store: Store,
        *,
        replica_id: str,
        poll_s: float,
        heartbeat_s: float,
        report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``sync()`` catches up and returns the epoch the replica may acknowledge; ``store``
        answers ``ack_epoch`` and ``forget_replica`` synchronously; ``report()``, if given,
        is sent with each acknowledgement."""
        self._sync = sync
        self._report = report
        self._store = store
        self.replica_id = replica_id
        self._poll_s, self._heartbeat_s = poll_s, heartbeat_s
        self._stop = threading.Event()
        self.acknowledged = -1
        self._acked_at = 0.0
        self.tick()  # acknowledged before the replica takes its first request
        self._thread = threading.Thread(target=self._run, name="epoch-watcher", daemon=True)
        self._thread.start()

    def tick(self) -> None:
        """One sync, and an acknowledgement if the epoch moved or a heartbeat is due.

        Never acknowledges less than before: an epoch once acknowledged stays kept.
        """
        epoch = max(self._sync(), self.acknowledged)
        now = time.monotonic()
        if epoch != self.acknowledged or now - self._acked_at >= self._heartbeat_s:
            if self._report is None:
                self._store.ack_epoch(self.replica_id, epoch)
            else:
                self._store.ack_epoch(self.replica_id, epoch, self._report())
            self.acknowledged, self._acked_at = epoch, now

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the store restarting: try again next poll
                logger.warning("epoch sync failed; retrying", exc_info=True)

    def stop(self) -> None:
        """Stop watching and tell the store this replica is gone."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._store.forget_replica(self.replica_id)
        except Exception:  # noqa: BLE001 - the store may be gone first at shutdown
            logger.warning("could not unregister replica %s", self.replica_id, exc_info=True)
