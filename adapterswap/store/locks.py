"""The locks that serialise ingest, training and deletion, across every node of a cluster.

``exclusive(store, "ingest")`` holds the store's lease of that name for the block (see
:mod:`adapterswap.store.leases`): it waits while another owner holds it, renews it in a
background thread every third of its time to live, and releases it at the end. An owner
that dies stops renewing, and its lease expires ``ttl_s`` later. An owner cut off from the
store for longer than that loses its lease; the block is not interrupted (it may be in the
middle of an atomic rename), but :class:`LeaseLost` is raised when it ends, so the work is
reported failed, never acknowledged as done under a lock it no longer held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from adapterswap.errors import LeaseLost
from adapterswap.store.protocol import Store

logger = logging.getLogger("adapterswap.locks")

LEASE_TTL_S = 30.0


@contextlib.contextmanager
def exclusive(store: Store, name: str, *, ttl_s: float = LEASE_TTL_S) -> Iterator[str]:
    """Hold lease ``name`` for the block; yields the owner name. ``store`` answers
    ``acquire_lease``, ``renew_lease`` and ``release_lease`` synchronously."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    wait = 0.02
    while not store.acquire_lease(name, owner, ttl_s):
        time.sleep(wait)
        wait = min(2 * wait, 1.0)
    stop, lost = threading.Event(), threading.Event()

    def renew() -> None:
        deadline = time.monotonic() + ttl_s
        while not stop.wait(ttl_s / 3):
            try:
                if not store.renew_lease(name, owner, ttl_s):
                    lost.set()
                    return
                deadline = time.monotonic() + ttl_s
            except Exception:  # noqa: BLE001 - the store restarting: try again until expiry
                logger.warning("renewing lease %s failed; retrying", name, exc_info=True)
                if time.monotonic() >= deadline:
                    lost.set()
                    return

    renewer = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    renewer.start()
    try:
        yield owner
    finally:
        stop.set()
        renewer.join()
        # Still ours at the end? A renewer starved of CPU may not have looked lately.
        if not lost.is_set() and not store.renew_lease(name, owner, ttl_s):
            lost.set()
        store.release_lease(name, owner)
    if lost.is_set():
        raise LeaseLost(
            f"lease {name!r} expired while this process held it (the store was unreachable "
            f"for over {ttl_s:g} s); the work done under it is not acknowledged: run it again"
        )
