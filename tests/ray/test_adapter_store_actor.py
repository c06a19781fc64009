"""The AdapterStore actor on a local cluster: named, detached, pinned, durable across kills."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.actor import ActorHandle

from actors.adapter_store import STORE_ACTOR_NAME, get_or_create_store, get_store
from actors.store_client import StoreClient
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import StoreNotRunning
from adapterswap.types import ActiveChanges, AdapterRef, AdapterStatus

REPO = Path(__file__).resolve().parents[2]
HR = "hr.b0001.000"
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def config(tmp_path: Path) -> Iterator[AdapterSwapConfig]:
    """A fresh home and a namespace of its own, so tests never share a store."""
    cfg = AdapterSwapConfig(home=str(tmp_path / "home"))
    cfg.ray.namespace = f"test-{uuid.uuid4().hex[:8]}"
    yield cfg
    with contextlib.suppress(StoreNotRunning):
        ray.kill(get_store(cfg.ray.namespace))


def _call(store: ActorHandle, method: str, *args: object, **kwargs: object) -> object:
    """A call that waits out a restart; only used for reads and for the test's own steps."""
    return ray.get(getattr(store, method).options(max_task_retries=-1).remote(*args, **kwargs))


def _pid(store: ActorHandle) -> int:
    ref = store.__ray_call__.options(max_task_retries=-1).remote(lambda _self: os.getpid())
    return ray.get(ref, timeout=30)


def _kill_and_wait_for_restart(store: ActorHandle) -> None:
    before = _pid(store)
    ray.kill(store, no_restart=False)
    deadline = time.monotonic() + 30
    # ray.kill is asynchronous: a call right after it may still reach the old process.
    while _pid(store) == before:
        assert time.monotonic() < deadline, "the store did not restart within 30 s"
        time.sleep(0.05)


def test_store_is_named_detached_and_on_the_head_node(config: AdapterSwapConfig) -> None:
    # A separate driver creates the store and exits; a non-detached actor would die with it.
    code = (
        "import ray\n"
        "from adapterswap.config import AdapterSwapConfig\n"
        "from actors.adapter_store import get_or_create_store\n"
        f"ray.init(address={ray.get_runtime_context().gcs_address!r})\n"
        f"cfg = AdapterSwapConfig(home={config.home!r})\n"
        f"cfg.ray.namespace = {config.ray.namespace!r}\n"
        "ray.get(get_or_create_store(cfg).create_key.remote('alice', ['hr']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]

    store = get_store(config.ray.namespace)
    assert [k.user for k in ray.get(store.list_keys.remote())] == ["alice"]
    again = get_or_create_store(config)  # get_if_exists: the same actor, not a second one
    assert _pid(again) == _pid(store)
    head = ray.get(store.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()))
    head_nodes = [n for n in ray.nodes() if "node:__internal_head__" in n["Resources"]]
    assert [n["NodeID"] for n in head_nodes] == [head]
    assert ray.get(store.__ray_call__.remote(lambda self: str(self.db_path))) == str(config.db_path)


def test_get_store_names_the_missing_namespace() -> None:
    with pytest.raises(StoreNotRunning, match=f"no AdapterStore actor '{STORE_ACTOR_NAME}' in"):
        get_store("no-such-namespace")


def test_every_acknowledged_mutation_survives_actor_kills(config: AdapterSwapConfig) -> None:
    store = get_or_create_store(config)
    key, record = ray.get(store.create_key.remote("alice", ["hr"], actor="cli"))
    _kill_and_wait_for_restart(store)
    ray.get(store.register_version.remote(HR, "hr", "mem://1", ["d1", "d2"], actor="trainer"))
    _kill_and_wait_for_restart(store)
    ray.get(store.activate.remote(HR, 1, actor="trainer"))
    _kill_and_wait_for_restart(store)
    ray.get(store.register_version.remote(HR, "hr", "mem://2", ["d2", "d3"], actor="trainer"))
    ray.get(store.activate.remote(HR, 2, actor="trainer"))
    _, other = ray.get(store.create_key.remote("bob", ["eng"], actor="cli"))
    ray.get(store.revoke_key.remote(other.key_id, actor="cli"))
    _kill_and_wait_for_restart(store)

    principal = _call(store, "lookup_key", key)
    assert (principal.key_id, principal.user, principal.groups) == (record.key_id, "alice", ("hr",))
    assert [k.revoked for k in _call(store, "list_keys")] == [False, True]
    versions = _call(store, "list_versions", HR)
    assert [(v.ref, v.status) for v in versions] == [
        (AdapterRef(HR, 1), AdapterStatus.REVOKED),
        (AdapterRef(HR, 2), AdapterStatus.ACTIVE),
    ]
    assert _call(store, "lineage", HR, 2) == ["d2", "d3"]
    assert _call(store, "epoch") == 2
    assert [e.action for e in _call(store, "audit_log")] == [
        "create_key",
        "register",
        "activate",
        "register",
        "revoke",
        "activate",
        "create_key",
        "revoke_key",
    ]
    # The restarted actor keeps working.
    ray.get(store.revoke.remote(HR, 2, reason="doc d2 deleted", actor="admin"))
    assert _call(store, "active_adapters", ["hr"]) == [] and _call(store, "epoch") == 3


def test_a_call_in_flight_when_the_actor_dies_is_not_replayed(config: AdapterSwapConfig) -> None:
    store = get_or_create_store(config)
    ray.get(store.epoch.remote())
    started = time.monotonic()
    in_flight = store.__ray_call__.remote(lambda _self: time.sleep(5))
    time.sleep(0.5)
    ray.kill(store, no_restart=False)
    with pytest.raises(ray.exceptions.RayActorError, match="may or may not have been executed"):
        ray.get(in_flight, timeout=30)
    assert time.monotonic() - started < 5  # it failed, rather than being run again
    # A read that asks for retries waits out the restart and then succeeds.
    assert _call(store, "epoch") == 0


def test_the_clients_reads_wait_out_a_restart(config: AdapterSwapConfig) -> None:
    store = get_or_create_store(config)
    client = StoreClient(store, timeout_s=30)
    job = client.create_job("train", "test", actor="cli")
    _kill_and_wait_for_restart(store)
    ray.kill(store, no_restart=False)  # and once more, with the reads sent at once
    assert client.epoch() == 0
    assert client.get_job(job.job_id) == job
    assert client.unfinished_deletions() == []
    assert client.active_changes(0) == ActiveChanges(0, 0, (), ())  # a delta crosses Ray too
    assert client.active_changes(1) is None  # ahead of the store: read a snapshot
