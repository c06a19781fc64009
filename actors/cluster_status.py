"""What the command line asks a running cluster: Ray's nodes and the Serve apps for
``adapterswap status --cluster``, and which model replicas are alive for ``adapterswap delete``.

This module imports ray. It joins a running cluster (the named one, see
:mod:`actors.ray_address`, else the one ``ray start`` recorded) and never starts one: with no
cluster there is nothing to report on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from actors.ray_address import check_gcs_answers, driver_address, named_cluster, ray_errors
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import ConfigError, NoCluster


def collect_cluster(config: AdapterSwapConfig) -> dict[str, Any]:
    """Nodes (alive, address, total resources) and every Serve app's deployments."""
    _join(config)
    nodes = [
        {
            "node_id": n["NodeID"],
            "address": n["NodeManagerAddress"],
            "alive": bool(n["Alive"]),
            "resources": {
                k: v
                for k, v in n["Resources"].items()
                if not k.startswith(("node:", "memory")) and k != "object_store_memory"
            },
        }
        for n in ray.nodes()
    ]
    return {"nodes": nodes, "serve": _serve_apps()}


def replica_liveness(config: AdapterSwapConfig) -> Callable[[str], bool]:
    """The deletion barrier's ``is_alive`` for ``adapterswap delete``, run outside Serve.

    On its first call it joins the running cluster and from then on asks Serve's controller
    (:class:`~actors.replica_oracle.ServeReplicaOracle`), as the ingress does. With no Ray
    running where the store is (no cluster named), nothing can serve: every registered
    replica is one that died without unregistering. A named cluster that cannot be asked
    counts every replica alive: the barrier fails closed.
    """
    from actors.replica_oracle import ServeReplicaOracle

    oracle: list[Callable[[str], bool]] = []

    def is_alive(replica_id: str) -> bool:
        if not oracle:
            try:
                _join(config)
                oracle.append(ServeReplicaOracle())
            except (NoCluster, ConfigError):
                named = named_cluster(config) is not None
                oracle.append(lambda _: named)
        return oracle[0](replica_id)

    return is_alive


def _join(config: AdapterSwapConfig) -> None:
    """Join the running cluster unless already joined: the named one (RAY_ADDRESS, else
    ``ray.address``), else the one ``ray start`` started here; NoCluster if there is none."""
    if ray.is_initialized():
        return
    address = driver_address(config) or "auto"
    check_gcs_answers(address)
    with ray_errors(address):
        ray.init(address=address, namespace=config.ray.namespace, log_to_driver=False)


def _serve_apps() -> dict[str, Any]:
    try:
        status = serve.status()
    except RayServeException:  # Serve is not running on this cluster
        return {}
    return {
        name: {
            "status": _name(app.status),
            "deployments": {
                deployment: {
                    "status": _name(info.status),
                    "replica_states": {_name(k): v for k, v in info.replica_states.items()},
                }
                for deployment, info in app.deployments.items()
            },
        }
        for name, app in status.applications.items()
    }


def _name(state: Any) -> str:
    """A Serve status as its name: some are enums, some already strings."""
    return str(getattr(state, "value", state))
