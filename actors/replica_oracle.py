"""Is a model replica still alive, as Ray Serve sees it? The deletion barrier's oracle.

The ingress deployment hands :class:`ServeReplicaOracle` to its gateway, and ``adapterswap
delete`` run beside a cluster uses it too (``actors.cluster_status.replica_liveness``).
"""

from __future__ import annotations

import logging
import threading
import time

import ray

logger = logging.getLogger("adapterswap.serve")


class ServeReplicaOracle:
    """The deletion barrier's ``is_alive``: is a model replica still alive, as Serve sees it?

    A replica registers in the store under ``serve.get_replica_context().replica_id.unique_id``;
    Serve's controller lists every replica of every application under the same id, in any
    state, until the replica's actor has stopped (crashed and replaced, scaled down, its
    node lost). So a replica counts as dead only once the controller no longer lists it,
    never for being slow. While the controller cannot be asked, every replica counts as
    alive: the barrier fails closed (a 503 after its timeout, the revocation in force). A
    listing serves ``ttl_s`` of barrier polls for the replicas it holds; a replica missing
    from it is looked up in a fresh one (it may have started since).
    """

    def __init__(self, ttl_s: float = 0.5, timeout_s: float = 5.0) -> None:
        self._ttl_s, self._timeout_s = ttl_s, timeout_s
        self._listed: set[str] | None = None
        self._at = -float("inf")
        self._lock = threading.Lock()

    def __call__(self, replica_id: str) -> bool:
        listed = self.replica_ids()
        if listed is not None and replica_id not in listed:
            listed = self.replica_ids(fresh=True)  # dead, or newer than the cached listing
        return listed is None or replica_id in listed

    def replica_ids(self, fresh: bool = False) -> set[str] | None:
        """Every replica id the controller lists (None: it could not be asked)."""
        with self._lock:
            if not fresh and time.monotonic() - self._at < self._ttl_s:
                return self._listed
        try:
            from ray.serve.context import _get_global_client

            controller = _get_global_client()._controller
            details = ray.get(
                controller.get_serve_instance_details.remote(), timeout=self._timeout_s
            )
            listed = {
                replica["replica_id"]
                for app in (details.get("applications") or {}).values()
                for deployment in (app.get("deployments") or {}).values()
                for replica in deployment.get("replicas") or []
            }
        except Exception:  # noqa: BLE001 - no answer: everyone counts as alive (fail closed)
            logger.warning("Serve's controller did not list replicas", exc_info=True)
            listed = None
        with self._lock:
            self._listed, self._at = listed, time.monotonic()
        return listed
