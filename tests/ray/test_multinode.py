"""Several nodes, simulated with ``ray.cluster_utils.Cluster`` on this machine: a head and two
worker nodes, each worker holding one ``accelerator`` slot, a stand-in for its GPU. Training
workers and model replicas each ask for a slot (``ray.train_resources_per_worker``,
``ray.replica_resources``), as they would ask for ``num_gpus: 1`` on a real cluster.

Checked, in one carried-through home:

- two shards train at the same time on the two worker nodes;
- a training worker killed with SIGKILL mid-run resumes from its last checkpoint;
- two model replicas land one per worker node, both serve, and ``status --cluster`` sees them;
- the AdapterStore is one actor, on the head, and both replicas follow its epoch;
- under steady load (3 clients): a replica killed with SIGKILL is replaced while the other
  serves; the store killed with SIGKILL restarts with every acknowledged version and epoch,
  requests wait out the restart, and a revocation through the restarted store is obeyed;
  a worker node removed degrades serving to one replica, and a node added brings back two;
  scaling down to one replica drains the other's in-flight requests (graceful shutdown).

Each fault test prints its figures (requests, 5xx, recovery time) and bounds the 5xx count.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.adapter_store import STORE_ACTOR_NAME, get_or_create_store, get_store
from actors.cluster_status import collect_cluster
from actors.serve_app import build_app
from actors.store_client import StoreClient
from actors.train_launcher import train_shards_with_ray
from adapterswap.catalog.ingest import ingest_files
from adapterswap.ops.status import collect_status, format_status
from adapterswap.store.locks import exclusive
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training
from adapterswap.types import AdapterStatus

SLOT = "accelerator"
SETTINGS = {  # over the tiny model's (tiny_config)
    "ray": {
        "train_num_cpus_per_worker": 0.25,
        "train_resources_per_worker": {SLOT: 1},
        "replica_num_cpus": 0.25,
        "replica_resources": {SLOT: 1},
        "max_replicas_per_node": 1,
    },
    # the tiny model's answers are noise: always route, at full weight
    "router": {"min_score": -1, "full_score": -1},
    "serve": {"max_new_tokens": 8},
}
DOCS = {
    "hr": "Parental leave lasts 23 weeks. Badges are issued by Morwenna Lusk.",
    "finance": "The fiscal year starts on 1 March. Invoices are paid in 37 days.",
}


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    workers = [nodes.add_node(num_cpus=1, resources={SLOT: 1}) for _ in range(2)]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes.head_node.node_id, {w.node_id for w in workers}, nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(cluster) -> None:
    """The Serve app (tests/ray/conftest.py's ``serve_app``) runs on this module's cluster."""


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_config, cluster):
    root = tmp_path_factory.mktemp("multinode")
    config = tiny_config(**SETTINGS)
    source = root / "docs.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"{g}-1", "group": g, "text": t}) + "\n" for g, t in DOCS.items())
    )
    ingest_files([source], config, embed=None, batch="b0001")
    return config, AdapterRegistry(config.db_path)


def _actors(class_name: str, *, alive: bool = False) -> list[dict]:
    """Actors of a class from the GCS actor table (the state API would need the dashboard)."""
    table = ray._private.state.actors().values()
    return [
        {
            "name": a["Name"],
            "state": a["State"],
            "node_id": a["Address"]["NodeID"],
            "start": a["StartTime"],
            "end": a["EndTime"],
            "pid": a["Pid"],
        }
        for a in table
        if a["ActorClassName"] == class_name and (not alive or a["State"] == "ALIVE")
    ]


def test_shards_train_at_once_on_different_nodes(cluster, home):
    _, worker_nodes, _ = cluster
    config, registry = home
    report = run_training(config, registry, train_shards=train_shards_with_ray)
    active = registry.list_versions(statuses=[AdapterStatus.ACTIVE])
    assert {v.group for v in active} == {"hr", "finance"}, report
    workers = _actors("RayTrainWorker")
    assert len(workers) == 2
    nodes = {w["node_id"] for w in workers}
    print(f"\ntraining workers on nodes {sorted(n[:8] for n in nodes)}")
    assert nodes == worker_nodes  # one shard per worker node, none on the head (no slot)
    (a_start, a_end), (b_start, b_end) = ((w["start"], w["end"]) for w in workers)
    assert a_start < b_end and b_start < a_end  # their lifetimes overlap: trained at once


@ray.remote(num_cpus=0)
class LockHolder:
    """Takes the ingest lock in turns with holders on other nodes, through the one store."""

    def __init__(self, namespace: str) -> None:
        self.store = StoreClient(get_store(namespace))

    def hold(self, rounds: int) -> list[tuple[float, float]]:
        spans = []
        for _ in range(rounds):
            with exclusive(self.store, "ingest"):
                start = time.time()
                time.sleep(0.2)
                spans.append((start, time.time()))
        return spans


def test_the_ingest_lock_holds_across_nodes(cluster, home):
    """A per-host file lock would let a holder on each node in at once (each host has its own
    lock file); the store's lease lets one in at a time, whichever node it runs on."""
    _, worker_nodes, _ = cluster
    config, _ = home
    get_or_create_store(config)
    holders = [
        LockHolder.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(config.ray.namespace)
        for node in sorted(worker_nodes)
    ]
    spans = sorted(s for spans in ray.get([h.hold.remote(4) for h in holders]) for s in spans)
    assert len(spans) == 8
    overlaps = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if a[1] > b[0]]
    assert overlaps == []


def test_a_killed_training_worker_resumes_from_its_checkpoint(cluster, home, tmp_path, tiny_config):
    config, registry = home
    slow = {"max_steps": 600, "checkpoint_every": 10, "seq_len": 64, "batch_size": 4}
    config = tiny_config(home=config.home, **SETTINGS, training=slow)
    source = tmp_path / "b2.jsonl"
    record = {"id": "hr-2", "group": "hr", "text": "The canteen opens at 7:40. " * 20}
    source.write_text(json.dumps(record) + "\n")
    ingest_files([source], config, embed=None, batch="b0002")
    events: list[dict] = []
    killed: list[int] = []
    checkpointed: list[float] = []

    def on_progress(event: dict) -> None:
        events.append(event)
        if event["step"] == 10:
            checkpointed.append(time.monotonic())
        # Ray Train's controller takes in a reported checkpoint when it next polls its workers
        # (every 2 s): a worker killed sooner after its first checkpoint restarts from scratch.
        if not killed and checkpointed and time.monotonic() - checkpointed[0] > 5:
            (worker,) = _actors("RayTrainWorker", alive=True)
            os.kill(worker["pid"], signal.SIGKILL)
            killed.append(event["step"])

    report = run_training(
        config, registry, train_shards=train_shards_with_ray, on_progress=on_progress
    )
    assert report.failed == [] and [t["id"] for t in report.trained] == ["hr.b0002.000"]
    steps = [e["step"] for e in events]
    resumed_at = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    print(f"\nworker killed after step {killed[0]}; resumed at step {steps[resumed_at]}")
    assert killed and steps.count(1) == 1  # resumed, not restarted from scratch
    assert steps[resumed_at] > 10 and steps[resumed_at] % 10 == 1  # from a checkpoint
    assert steps[-1] == 600


@pytest.fixture(scope="module")
def served(home, serve_app):
    config, registry = home
    key = registry.create_key("hana", ["hr", "finance"])[0]
    return serve_app(config, num_replicas=2), key


def _ask(port: int, key: str, timeout: float = 60) -> tuple[int, dict]:
    body = json.dumps({"prompt": "Parental leave", "max_tokens": 2}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


class Load:
    """``clients`` threads asking in a loop until stopped; counts answers by status."""

    def __init__(self, port: int, key: str, clients: int = 3) -> None:
        self.statuses: list[int] = []
        self.adapters: list[tuple[float, list[dict]]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(port, key), daemon=True)
            for _ in range(clients)
        ]

    def _run(self, port: int, key: str) -> None:
        while not self._stop.is_set():
            try:
                status, body = _ask(port, key)
            except (OSError, http.client.HTTPException):  # the connection dropped: no answer
                status, body = 599, {}
            self.statuses.append(status)
            if status == 200:
                self.adapters.append((time.monotonic(), body["adapterswap"]["adapters"]))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def summary(self) -> str:
        errors = sum(1 for s in self.statuses if s >= 500)
        return f"{len(self.statuses)} requests, {errors} 5xx"


def _wait_for(condition, what: str, timeout: float = 60) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)
    return time.monotonic() - started


def _both_at(registry: AdapterRegistry, epoch: int) -> bool:
    """Two live replicas (heartbeat within 10 s), both acknowledging ``epoch``."""
    live = registry.replicas_behind(epoch + 1, 10.0)  # every live replica, with its epoch
    return len(live) == 2 and all(e == epoch for _, e in live)


def _replicas() -> list[dict]:
    return _actors("ServeReplica:adapterswap:Model", alive=True)


def test_replicas_spread_one_per_node_and_follow_the_one_store(cluster, home, served):
    head_node, worker_nodes, _ = cluster
    config, registry = home
    port, key = served
    replicas = _replicas()
    assert len(replicas) == 2 and {r["node_id"] for r in replicas} == worker_nodes

    stores = [a for a in _actors("AdapterRegistry") if a["name"] == STORE_ACTOR_NAME]
    assert len(stores) == 1 and stores[0]["state"] == "ALIVE" and stores[0]["node_id"] == head_node

    status = collect_status(config, registry, collect_cluster(config))  # `status --cluster`
    nodes = status["cluster"]["nodes"]
    assert len(nodes) == 3 and all(n["alive"] for n in nodes)
    assert sorted(n["resources"].get(SLOT, 0) for n in nodes) == [0, 1, 1]
    model = status["cluster"]["serve"]["adapterswap"]["deployments"]["Model"]
    assert model["status"] == "HEALTHY" and model["replica_states"] == {"RUNNING": 2}
    assert len(status["replicas"]) == 2  # both heartbeat into the store
    assert "serve app adapterswap: RUNNING" in format_status(status)

    answers = [_ask(port, key) for _ in range(6)]
    assert all(status == 200 and body["adapterswap"]["adapters"] for status, body in answers)

    # A revocation through the store reaches both replicas on their nodes.
    active = registry.list_versions(statuses=[AdapterStatus.ACTIVE])
    hr = next(v for v in active if v.group == "hr" and v.adapter_id.endswith("b0001.000"))
    store = get_store(config.ray.namespace)
    ray.get(store.revoke.remote(hr.adapter_id, hr.version, reason="multinode test"))
    epoch = ray.get(store.epoch.remote())

    _wait_for(lambda: _both_at(registry, epoch), f"both replicas at epoch {epoch}", timeout=30)
    after = [_ask(port, key)[1]["adapterswap"]["adapters"] for _ in range(4)]
    assert all(a["id"] != hr.adapter_id for adapters in after for a in adapters)


def test_a_killed_replica_is_replaced_while_the_other_serves(served):
    port, key = served
    victim = _replicas()[0]
    with Load(port, key) as load:
        time.sleep(2)
        os.kill(victim["pid"], signal.SIGKILL)
        back = _wait_for(
            lambda: len(_replicas()) == 2 and victim["pid"] not in {r["pid"] for r in _replicas()},
            "a new replica",
        )
        time.sleep(2)
    errors = sum(1 for s in load.statuses if s >= 500)
    print(f"\nreplica killed under load: {load.summary()}; replaced after {back:.1f} s")
    assert load.statuses.count(200) > errors and errors <= 3  # at most the in-flight ones
    assert _ask(port, key)[0] == 200


def test_a_killed_store_restarts_with_its_state_and_serving_goes_on(cluster, home, served):
    config, registry = home
    port, key = served
    store = get_store(config.ray.namespace)
    before = ray.get(store.active_snapshot.remote())  # (epoch, active versions)
    with Load(port, key) as load:
        time.sleep(1)
        (actor,) = [
            a for a in _actors("AdapterRegistry", alive=True) if a["name"] == STORE_ACTOR_NAME
        ]
        os.kill(actor["pid"], signal.SIGKILL)
        down = _wait_for(
            lambda: any(a["pid"] != actor["pid"] for a in _actors("AdapterRegistry", alive=True)),
            "the store to restart",
        )
        time.sleep(2)
    print(f"\nstore killed under load: {load.summary()}; back after {down:.1f} s")
    assert all(s == 200 for s in load.statuses)  # reads waited out the restart
    store = get_store(config.ray.namespace)
    after = ray.get(store.active_snapshot.options(max_task_retries=-1).remote())
    assert after == before and after[1]  # everything acknowledged survived

    # The restarted store is still the authority: a revocation through it is obeyed.
    fin = next(v for v in after[1] if v.group == "finance")
    with Load(port, key) as load:
        ray.get(store.revoke.remote(fin.adapter_id, fin.version, reason="after restart"))
        epoch = ray.get(store.epoch.remote())
        _wait_for(lambda: _both_at(registry, epoch), f"both replicas at epoch {epoch}", 30)
        acknowledged = time.monotonic()
        time.sleep(2)
    late = [a for t, adapters in load.adapters if t > acknowledged for a in adapters]
    assert late and all(a["id"] != fin.adapter_id for a in late)


def test_a_removed_node_degrades_then_recovers_without_data_loss(cluster, home, served):
    nodes = cluster[2]
    config, registry = home
    port, key = served
    before = registry.active_snapshot()
    victim = _replicas()[0]
    node = next(n for n in nodes.worker_nodes if n.node_id == victim["node_id"])
    with Load(port, key) as load:
        time.sleep(1)
        nodes.remove_node(node)
        _wait_for(lambda: len(_replicas()) == 1, "the lost replica to be noticed")
        time.sleep(2)
        degraded = load.statuses.count(200)
        nodes.add_node(num_cpus=1, resources={SLOT: 1})
        back = _wait_for(lambda: len(_replicas()) == 2, "a replica on the new node", 120)
        time.sleep(2)
    print(f"\nnode removed under load: {load.summary()}; 2 replicas again after {back:.1f} s")
    assert degraded > 0 and load.statuses[-1] == 200
    # Each client's request in flight through the lost node (its HTTP proxy, or the ingress
    # replica if it ran there) fails, and at most one more per client while Serve notices.
    assert sum(1 for s in load.statuses if s >= 500) <= 2 * 3
    assert registry.active_snapshot() == before  # nothing lost: same epoch, same versions
    status, body = _ask(port, key)
    assert status == 200 and body["adapterswap"]["adapters"]  # and still served from them


def test_scaling_down_drains_in_flight_requests(home, served):
    config, _ = home
    port, key = served
    with Load(port, key) as load:
        time.sleep(1)
        serve.run(  # the same app with one replica: Serve drains the other before stopping it
            build_app({"home": config.home, "config": config.model_dump(), "num_replicas": 1}),
            name="adapterswap",
            route_prefix="/",
        )
        _wait_for(lambda: len(_replicas()) == 1, "one replica")
        time.sleep(1)
    print(f"\nscaled 2 -> 1 replica under load: {load.summary()}")
    assert load.statuses and all(s == 200 for s in load.statuses)
