"""Issue 12, point 2: a 200 from DELETE always means the document is gone.

Each attack the review found, through the HTTP API of the real app (one model replica in
this process, jobs recorded and run here by the test). Training runs the real shard
trainer on the tiny model, in this process instead of Ray Train: that is the only part
substituted. Every test here failed on 25591f0.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from support import in_process_app, publish_random_adapter

from adapterswap.catalog.dataset import Catalog
from adapterswap.delete.job import run_deletion
from adapterswap.errors import IllegalTransition
from adapterswap.store.records import DeletionState
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training
from adapterswap.train.launcher import ShardOutcome
from adapterswap.train.shard import finish_shard_run, start_shard_trainer
from adapterswap.types import AdapterStatus

GROUP = "hr"


def train_in_process(runs, config, *, on_progress=None, fail_once_at_step=None):
    """``train_shards_with_ray``'s contract, run here: the real trainer and artifacts."""
    outcomes = []
    for run in runs:
        try:
            trainer, _ = start_shard_trainer(run, torch.device("cpu"))
            while not trainer.done:
                trainer.step()
            finish_shard_run(run, trainer)
            outcomes.append(ShardOutcome(run, None))
        except Exception as exc:  # noqa: BLE001 - a shard's failure is its outcome
            outcomes.append(ShardOutcome(run, f"{type(exc).__name__}: {exc}"))
    return outcomes


def failing_training(runs, config, **_):
    return [ShardOutcome(run, "RuntimeError: injected: retraining failed") for run in runs]


@pytest.fixture
def world(tiny_config):
    config = tiny_config(training={"max_steps": 1})
    registry = AdapterRegistry(config.db_path)
    app, _ = in_process_app(config, registry)
    admin = registry.create_key("root", [GROUP], admin=True)[0]
    client = TestClient(app, raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {admin}"
    yield client, config, registry
    registry.close()


def doc(doc_id: str, text: str, **extra) -> dict:
    return {"id": doc_id, "text": text, "group": GROUP, **extra}


def ingest(client, *docs, replace=False):
    # json.dumps escapes a lone surrogate as \\ud800, as a hostile client would send it
    body = json.dumps({"documents": list(docs), "replace": replace})
    return client.post("/v1/documents", content=body, headers={"Content-Type": "application/json"})


def rows(config, doc_id: str) -> list[dict]:
    table = Catalog(config.storage).read(["id", "text", "content_hash"])
    return [r for r in table.to_pylist() if r["id"] == doc_id]


def publish_holding(client, registry, adapter_id: str, doc_ids: list[str], seed: int):
    """An active version whose lineage holds ``doc_ids`` (as a finished training leaves it)."""
    gateway = client.app.state.gateway
    texts = [f"text of {d}" for d in doc_ids]
    return publish_random_adapter(
        gateway.config, registry, gateway._embed, adapter_id, GROUP, texts, seed, doc_ids
    )


def active_holders(registry, doc_id: str) -> list:
    return [v.ref for v in registry.versions_containing(doc_id) if v.status == AdapterStatus.ACTIVE]


def finish(config, registry, job_id=None, train_shards=train_in_process):
    """Run the delete job here (a DELETE's own job, or ``adapterswap delete --finish``)."""
    return run_deletion(config, registry, train_shards=train_shards, job_id=job_id)


def test_replacing_twice_quickly_leaves_one_row(world):
    client, config, registry = world
    assert ingest(client, doc("memo", "The canteen opens at eight.")).status_code == 200
    first = ingest(client, doc("memo", "The canteen opens at half past seven."), replace=True)
    second = ingest(client, doc("memo", "The canteen opens at seven."), replace=True)
    assert first.status_code == second.status_code == 200, second.text
    assert [r["text"] for r in rows(config, "memo")] == ["The canteen opens at seven."]
    assert Catalog(config.storage).duplicate_ids() == []
    # each replaced content has its own deletion, already out of the catalog
    hashes = [(d.content_hash, d.state) for d in registry.deletions("memo")]
    assert len({h for h, _ in hashes}) == 2 and {s for _, s in hashes} == {"removed"}


def test_concurrent_replaces_of_one_id_leave_one_row(world):
    client, config, _ = world
    assert ingest(client, doc("memo", "Version zero.")).status_code == 200
    start = threading.Barrier(4)
    answers = []

    def replace(i: int) -> None:
        start.wait()
        answers.append(ingest(client, doc("memo", f"Version {i + 1}."), replace=True))

    threads = [threading.Thread(target=replace, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [200] * 4, [a.text for a in answers]
    assert len(rows(config, "memo")) == 1 and Catalog(config.storage).duplicate_ids() == []


def test_a_delete_after_two_replaces_revokes_and_removes_everything(world):
    client, config, registry = world
    ingest(client, doc("memo", "one"))
    ingest(client, doc("memo", "two"), replace=True)
    ingest(client, doc("memo", "three"), replace=True)
    (current,) = rows(config, "memo")
    # A version trained on the current text (its lineage records the content it saw) is not
    # held back by the deletions of the replaced texts; one that does not say is.
    serving = registry.register_version(
        "hr.b0009.000", GROUP, "x", ["memo"], content_hashes={"memo": current["content_hash"]}
    ).ref
    registry.activate(serving.id, serving.version)
    unknown = registry.register_version("hr.b0010.000", GROUP, "x", ["memo"]).ref
    with pytest.raises(IllegalTransition, match="'memo', whose deletion is unfinished"):
        registry.activate(unknown.id, unknown.version)
    answer = client.delete("/v1/documents/memo")
    assert answer.status_code == 200, answer.text
    assert answer.json()["revoked"] == [{"id": serving.id, "version": serving.version}]
    assert active_holders(registry, "memo") == []
    assert client.get("/v1/documents/memo").json()["status"] == "deleting"
    finish(config, registry)
    assert rows(config, "memo") == []
    assert [d.state for d in registry.deletions("memo")] == [DeletionState.PURGED] * 3
    assert client.get("/v1/documents/memo").status_code == 404
    assert client.delete("/v1/documents/memo").status_code == 404  # gone: nothing to delete


def test_a_deletion_stuck_at_removed_blocks_reingest_activation_and_a_new_delete_acts(world):
    client, config, registry = world
    ingest(client, doc("memo", "The vault code is 7319."), doc("other", "Lunch is at noon."))
    assert run_training(config, registry, train_shards=train_in_process).failed == []
    (trained,) = active_holders(registry, "memo")
    first = client.delete("/v1/documents/memo")
    assert first.status_code == 200 and first.json()["revoked"] == [
        {"id": trained.id, "version": trained.version}
    ]
    finish(config, registry, first.json()["job"], failing_training)  # stuck at removed
    stuck = registry.deletion("memo")
    assert stuck.state == DeletionState.REMOVED
    assert registry.get_job(stuck.job_id).state == "failed"

    again = ingest(client, doc("memo", "The vault code is 7319."))
    assert again.status_code == 400, again.text  # was 200, and training then served it
    message = again.json()["error"]["message"]
    assert "'memo' is still being deleted (deletion removed" in message
    changed = ingest(client, doc("memo", "Some other text."))  # another content: refused too
    assert changed.status_code == 400
    # whatever trains a version holding it, it is not activated while the deletion is unfinished
    stale = registry.register_version(trained.id, GROUP, "x", ["memo", "other"]).version
    with pytest.raises(IllegalTransition, match="'memo', whose deletion is unfinished"):
        registry.activate(trained.id, stale)
    registry.fail(trained.id, stale)

    repeat = client.delete("/v1/documents/memo")  # was a silent no-op
    assert repeat.status_code == 200
    assert repeat.json()["job"] != stuck.job_id  # the old job ended: a new one carries it on
    assert registry.deletion("memo").job_id == repeat.json()["job"]
    report = finish(config, registry, repeat.json()["job"])
    assert registry.deletion("memo").state == DeletionState.PURGED, report
    assert all("memo" not in registry.lineage(v.id, v.version) for v in active_versions(registry))
    assert ingest(client, doc("memo", "The vault code is 7319.")).status_code == 200  # now fine


def active_versions(registry):
    return [v.ref for v in registry.list_versions(statuses=[AdapterStatus.ACTIVE])]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metadata", {"note": "\ud800"}),  # the review's attack
        ("metadata", {"\udfff": 1}),
        ("text", "half \ud800 past"),
        ("group", "HR"),
    ],
)
def test_a_failed_replace_changes_nothing(world, field, value):
    client, config, registry = world
    ingest(client, doc("memo", "The canteen opens at eight."))
    serving = publish_holding(client, registry, "hr.b0009.000", ["memo"], 9)
    before = (registry.epoch(), len(registry.audit_log()), rows(config, "memo"))
    bad = doc("memo", "The canteen opens at half past seven.") | {field: value}
    answer = ingest(client, bad, replace=True)
    assert answer.status_code == 400, answer.text  # was a 500, after the revocation
    assert field in answer.json()["error"]["message"]
    assert registry.get_version(serving.id, serving.version).status == AdapterStatus.ACTIVE
    assert (registry.epoch(), len(registry.audit_log()), rows(config, "memo")) == before
    assert registry.deletions("memo") == []


def test_a_delete_racing_replaces_still_deletes_for_good(world):
    """DELETE and replacements of one id at once: whatever the order, once the 200 came and
    the job ran, the id is gone (a replace that lost the race is refused: still deleting)."""
    client, config, registry = world
    for round_ in range(3):
        doc_id = f"race-{round_}"
        ingest(client, doc(doc_id, "original"))
        start = threading.Barrier(3)
        answers: dict[str, list] = {"delete": [], "replace": []}

        def delete(doc_id=doc_id, start=start, answers=answers) -> None:
            start.wait()
            answers["delete"].append(client.delete(f"/v1/documents/{doc_id}"))

        def replace(i: int, doc_id=doc_id, start=start, answers=answers) -> None:
            start.wait()
            answers["replace"].append(ingest(client, doc(doc_id, f"new {i}"), replace=True))

        threads = [threading.Thread(target=delete)]
        threads += [threading.Thread(target=replace, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers["delete"][0].status_code == 200, answers["delete"][0].text
        for answer in answers["replace"]:
            assert answer.status_code == 200 or (
                answer.status_code == 400 and "still being deleted" in answer.text
            ), answer.text
        finish(config, registry)
        assert rows(config, doc_id) == [], round_
        assert all(d.state == DeletionState.PURGED for d in registry.deletions(doc_id))
