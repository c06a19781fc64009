"""The AdapterStore actor: AdapterRegistry behind ``ray.remote``, named, detached, restartable.

All logic stays in :class:`adapterswap.store.registry.AdapterRegistry`. The actor's only state is
the SQLite file whose path it is constructed with, so a restarted actor re-opens the same
file and serves exactly what was acknowledged before the crash.
"""

from __future__ import annotations

import ray
from ray.actor import ActorHandle

from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import StoreNotRunning
from adapterswap.store.registry import AdapterRegistry

STORE_ACTOR_NAME = "adapter_store"
# A sliver of the head node's built-in resource pins the actor there, so its SQLite file
# lives on the head's disk and a restart finds it again.
_HEAD_NODE = {"node:__internal_head__": 0.001}

# max_restarts=-1: always come back after a crash. max_task_retries=0: a mutation is never
# replayed, because one in flight when the actor died may already have committed (a second
# register_version would add another version, a second activate would raise).
# Measured on Ray 2.60: a call submitted while the actor restarts (about 0.2-0.7 s after a
# kill) fails at once with ActorUnavailableError ("may or may not have been executed"); it is
# not queued. Reads are idempotent, so the store's client (actors.store_client.StoreClient)
# asks for retries per read: ``store.epoch.options(max_task_retries=-1).remote()``.
AdapterStore = ray.remote(max_restarts=-1, max_task_retries=0)(AdapterRegistry)


def get_or_create_store(config: AdapterSwapConfig) -> ActorHandle:
    """The running store of ``config.ray.namespace``, started on the head node if absent."""
    return AdapterStore.options(
        name=STORE_ACTOR_NAME,
        namespace=config.ray.namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=config.ray.store_num_cpus,
        resources=_HEAD_NODE,
    ).remote(str(config.db_path))


def get_store(namespace: str) -> ActorHandle:
    """The running store of ``namespace``; StoreNotRunning if there is none."""
    try:
        return ray.get_actor(STORE_ACTOR_NAME, namespace=namespace)
    except ValueError:
        raise StoreNotRunning(
            f"no AdapterStore actor {STORE_ACTOR_NAME!r} in Ray namespace {namespace!r}; "
            "start one with get_or_create_store(config) (e.g. `adapterswap serve`)"
        ) from None
