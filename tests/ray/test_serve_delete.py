"""Knowledge management over HTTP on a served app: ingest, train, and a delete under load.

Documents go in through ``POST /v1/documents``, are trained by ``POST /v1/train`` (a job run
by a runner actor, followed through ``GET /v1/jobs/{id}``), then one is deleted while
threads keep asking: the DELETE returns once the model replica acknowledged the revocation,
after which no response names the revoked version, and no request fails.
"""

from __future__ import annotations

import threading
import time

import httpx2 as httpx
import pytest

from actors.replica_oracle import ServeReplicaOracle
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.delete.job import request_delete
from adapterswap.store.records import DeletionState
from adapterswap.store.registry import AdapterRegistry

HR = "hr.b0001.000"
LEFTOVER = {"id": "old-memo", "text": "An old memo about the car park.", "group": "hr"}
DOCS = [
    {"id": "hr-secret", "text": "The Skarvik vault phrase is Quillon Amber.", "group": "hr"},
    {"id": "hr-leave", "text": "Parental leave lasts 23 weeks.", "group": "hr"},
    {"id": "hr-badge", "text": "Badges are issued by Morwenna Lusk.", "group": "hr"},
    {"id": "fin-days", "text": "Invoices are paid in 37 days.", "group": "finance"},
]


@pytest.fixture(scope="module")
def app(tiny_config, serve_app):
    config = tiny_config(
        ray={"train_num_cpus_per_worker": 0.5},
        # the tiny model's answers are noise: always route, at full weight
        router={"min_score": -1, "full_score": -1},
        serve={"epoch_poll_s": 0.05},
    )
    registry = AdapterRegistry(config.db_path)
    keys = {
        "admin": registry.create_key("root", ["hr", "finance"], admin=True)[0],
        "hr": registry.create_key("hana", ["hr"])[0],
    }
    # A delete that a crash left unfinished: the app finishes it when it starts.
    ingest_records([RawRecord("r", LEFTOVER)], config, embed=None, batch="b0000")
    request_delete(registry, Catalog(config.storage), [LEFTOVER["id"]], "crashed", "root")
    port = serve_app(config)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client, keys, registry


def call(client, key, method, path, body=None):
    return client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})


def wait_for_job(client, key, job_id, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while True:
        job = call(client, key, "GET", f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


def test_ingest_train_and_delete_under_load_over_http(app):
    client, keys, registry = app
    deadline = time.monotonic() + 120
    while registry.deletion(LEFTOVER["id"]).state != DeletionState.PURGED:  # resumed at start
        assert time.monotonic() < deadline, registry.deletion(LEFTOVER["id"])
        time.sleep(0.5)
    accepted = call(client, keys["admin"], "POST", "/v1/documents", {"documents": DOCS}).json()
    assert accepted["accepted"] == 4
    assert call(client, keys["hr"], "POST", "/v1/train").status_code == 403
    submitted = call(client, keys["admin"], "POST", "/v1/train").json()
    job = wait_for_job(client, keys["admin"], submitted["job"])
    assert job["state"] == "succeeded", job
    assert sorted(t["id"] for t in job["result"]["trained"]) == ["finance.b0001.000", HR]
    listed = call(client, keys["hr"], "GET", "/v1/adapters").json()["data"]
    assert [(a["id"], a["version"]) for a in listed] == [(HR, 1)]

    answers, stop = [], threading.Event()

    def ask() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            while not stop.is_set():
                sent = time.monotonic()
                body = {"prompt": "How long is parental leave?", "max_tokens": 2}
                response = call(own, keys["hr"], "POST", "/v1/completions", body)
                used = []
                if response.status_code == 200:
                    used = [
                        (a["id"], a["version"]) for a in response.json()["adapterswap"]["adapters"]
                    ]
                answers.append((sent, response.status_code, used))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    deleted = call(client, keys["admin"], "DELETE", "/v1/documents/hr-secret")
    returned = time.monotonic()
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()

    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["revoked"] == [{"id": HR, "version": 1}]
    assert [status for _, status, _ in answers if status != 200] == []  # none failed
    after = [used for sent, _, used in answers if sent > returned]
    assert after and all((HR, 1) not in used for used in after)
    assert any((HR, 1) in used for sent, _, used in answers if sent < returned - 1)

    job = wait_for_job(client, keys["admin"], deleted.json()["job"])
    assert job["state"] == "succeeded" and job["result"]["purged"] == [f"{HR}@v1"]
    listed = call(client, keys["hr"], "GET", "/v1/adapters").json()["data"]
    assert [(a["id"], a["version"]) for a in listed] == [(HR, 2)]
    assert call(client, keys["admin"], "GET", "/v1/documents/hr-secret").status_code == 404
    assert call(client, keys["admin"], "DELETE", "/v1/documents/hr-secret").status_code == 404
    assert call(client, keys["hr"], "DELETE", "/v1/documents/hr-leave").status_code == 403
    assert registry.replicas_behind(registry.epoch(), live_within_s=60) == []


def test_the_barrier_asks_serve_which_model_replicas_are_alive(app):
    """A replica leaves the deletion barrier only when Serve no longer lists it: the ids the
    replicas register under are the ones Serve's controller lists."""
    _, _, registry = app
    oracle = ServeReplicaOracle(ttl_s=0)
    registered = [replica for replica, _, _ in registry.live_replicas(1e12)]
    assert registered and all(oracle(replica) for replica in registered)
    assert not oracle("a-replica-serve-never-had")
