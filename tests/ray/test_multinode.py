"""Several nodes, simulated with ``ray.cluster_utils.Cluster`` on this machine: a head and two
worker nodes, each worker holding one ``accelerator`` slot, a stand-in for its GPU. Training
workers and model replicas each ask for a slot (``ray.train_resources_per_worker``,
``ray.replica_resources``), as they would ask for ``num_gpus: 1`` on a real cluster.

Checked, in one carried-through home: two shards train at the same time on the two worker
nodes; two model replicas land one per worker node and both serve; the AdapterStore is one
actor, on the head, and both replicas follow its epoch.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from support import free_port

from actors.adapter_store import STORE_ACTOR_NAME, get_store
from adapterswap.config import load_config
from adapterswap.ingest import ingest_files
from adapterswap.registry import AdapterRegistry, AdapterStatus
from adapterswap.serve_app import build_app
from adapterswap.train_job import run_training

SLOT = "accelerator"
OVERRIDES = [
    "model.spec=tiny-random",
    "sharding.strategy=sequential",
    "training.max_steps=4",
    "training.seq_len=32",
    "training.batch_size=2",
    "ray.train_num_cpus_per_worker=0.25",
    f"ray.train_resources_per_worker={{{SLOT}: 1}}",
    "ray.replica_num_cpus=0.25",
    f"ray.replica_resources={{{SLOT}: 1}}",
    "ray.max_replicas_per_node=1",
    "router.min_score=-1",  # the tiny model's answers are noise: always route, to test routing
    "serve.max_new_tokens=8",
]
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
        yield nodes.head_node.node_id, {w.node_id for w in workers}
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def home(tmp_path_factory, cluster):
    root = tmp_path_factory.mktemp("multinode")
    overrides = [*OVERRIDES, f"model.cache_dir={root / 'models'}"]
    config = load_config(home=str(root / "home"), environ={}, overrides=overrides)
    source = root / "docs.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"{g}-1", "group": g, "text": t}) + "\n" for g, t in DOCS.items())
    )
    ingest_files([source], config, embed=None, batch="b0001")
    return config, overrides, AdapterRegistry(config.db_path)


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
        }
        for a in table
        if a["ActorClassName"] == class_name and (not alive or a["State"] == "ALIVE")
    ]


def test_shards_train_at_once_on_different_nodes(cluster, home):
    _, worker_nodes = cluster
    config, _, registry = home
    report = run_training(config, registry)
    active = registry.list_versions(statuses=[AdapterStatus.ACTIVE])
    assert {v.group for v in active} == {"hr", "finance"}, report
    workers = _actors("RayTrainWorker")
    assert len(workers) == 2
    nodes = {w["node_id"] for w in workers}
    print(f"\ntraining workers on nodes {sorted(n[:8] for n in nodes)}")
    assert nodes == worker_nodes  # one shard per worker node, none on the head (no slot)
    (a_start, a_end), (b_start, b_end) = ((w["start"], w["end"]) for w in workers)
    assert a_start < b_end and b_start < a_end  # their lifetimes overlap: trained at once


def test_replicas_spread_one_per_node_and_follow_the_one_store(cluster, home):
    head_node, worker_nodes = cluster
    config, overrides, registry = home
    key = registry.create_key("hana", ["hr", "finance"])[0]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"home": config.home, "overrides": overrides, "num_replicas": 2}),
        name="adapterswap",
        route_prefix="/",
    )
    replicas = _actors("ServeReplica:adapterswap:Model", alive=True)
    assert len(replicas) == 2 and {r["node_id"] for r in replicas} == worker_nodes

    stores = [a for a in _actors("AdapterRegistry") if a["name"] == STORE_ACTOR_NAME]
    assert len(stores) == 1 and stores[0]["state"] == "ALIVE" and stores[0]["node_id"] == head_node

    def ask() -> dict:
        body = json.dumps({"model": "m", "prompt": "Parental leave", "max_tokens": 2}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    served = [ask()["adapterswap"]["adapters"] for _ in range(6)]
    assert all(adapters for adapters in served)

    # A revocation through the store reaches both replicas on their nodes.
    active = registry.list_versions(statuses=[AdapterStatus.ACTIVE])
    hr = next(v for v in active if v.group == "hr")
    store = get_store(config.ray.namespace)
    ray.get(store.revoke.remote(hr.adapter_id, hr.version, reason="multinode test"))
    epoch = ray.get(store.epoch.remote())
    deadline = time.monotonic() + 30
    while True:
        live = registry.replicas_behind(epoch + 1, 10.0)  # every live replica, with its epoch
        if len(live) == 2 and all(e == epoch for _, e in live):
            break  # two live replicas, both at the store's epoch
        assert time.monotonic() < deadline, f"replicas did not reach epoch {epoch}: {live}"
        time.sleep(0.2)
    after = [ask()["adapterswap"]["adapters"] for _ in range(4)]
    assert all(a["id"] != hr.adapter_id for adapters in after for a in adapters)
