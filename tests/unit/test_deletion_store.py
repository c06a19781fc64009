"""The deletion state machine in the store, the replica barrier, and catalog removal. No Ray."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import load_config
from adapterswap.delete.job import request_delete, wait_for_replicas
from adapterswap.engine.epoch_watch import EpochWatcher
from adapterswap.errors import IllegalTransition, NotFound, RevocationTimeout
from adapterswap.route.active_set import ActiveSet
from adapterswap.store.records import DeletionState, JobState
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.plan import shards_to_train
from adapterswap.types import AdapterStatus

CANARY = "zq-canary-5521 the vault code is Quillon Amber"


@pytest.fixture
def reg(tmp_path: Path) -> AdapterRegistry:
    registry = AdapterRegistry(tmp_path / "store.sqlite")
    yield registry
    registry.close()


def _active(reg: AdapterRegistry, adapter_id: str, docs: list[str]) -> int:
    version = reg.register_version(adapter_id, adapter_id.split(".")[0], "x", docs).version
    reg.activate(adapter_id, version)
    return version


def test_begin_delete_revokes_fails_records_and_moves_the_epoch_in_one_step(reg):
    _active(reg, "hr.b1.000", ["d1", "d2"])
    _active(reg, "hr.b1.001", ["d3"])
    training = reg.register_version("hr.b1.000", "hr", "x", ["d1", "d2"]).version
    epoch = reg.epoch()
    job, records = reg.begin_delete(["d1"], "process:h:1", actor="root")
    assert reg.epoch() == epoch + 1  # one transaction, one epoch step
    assert job.kind == "delete" and job.state == "pending"
    (record,) = records
    assert (record.doc_id, record.state, record.job_id) == (
        "d1",
        DeletionState.DELETING,
        job.job_id,
    )
    assert [(r.id, r.version) for r in record.revoked] == [("hr.b1.000", 1)]
    assert record.epoch == epoch + 1
    assert reg.get_version("hr.b1.000", 1).status == AdapterStatus.REVOKED
    assert reg.get_version("hr.b1.000", training).status == AdapterStatus.FAILED
    assert reg.get_version("hr.b1.001", 1).status == AdapterStatus.ACTIVE  # other shard: untouched
    actions = [(e.action, e.actor) for e in reg.audit_log()]
    assert ("delete_requested", "root") in actions and ("revoke", "root") in actions

    again_job, again = reg.begin_delete(["d1"], "process:h:2", actor="root")
    assert again_job is None and again[0].job_id == job.job_id  # in progress: a no-op
    assert reg.epoch() == epoch + 1


def test_no_version_holding_a_deleting_document_can_be_activated(reg):
    _active(reg, "hr.b1.000", ["d1", "d2"])
    reg.begin_delete(["d1"], "r")
    stale = reg.register_version("hr.b1.000", "hr", "x", ["d1", "d2"]).version  # read too early
    with pytest.raises(IllegalTransition, match="'d1', whose deletion is unfinished"):
        reg.activate("hr.b1.000", stale)
    assert reg.get_version("hr.b1.000", stale).status == AdapterStatus.TRAINING
    clean = reg.register_version("hr.b1.000", "hr", "x", ["d2"]).version
    assert reg.activate("hr.b1.000", clean).status == AdapterStatus.ACTIVE


@pytest.mark.parametrize("state", [DeletionState.REMOVED, DeletionState.RETRAINED])
def test_activation_stays_blocked_until_the_deletion_is_purged(reg, state):
    """Stuck at removed (retraining failed) or retrained: still blocked. Only purged frees it."""
    _active(reg, "hr.b1.000", ["d1", "d2"])
    _, (record,) = reg.begin_delete(["d1"], "r")
    reg.advance_deletion([record], state)
    stale = reg.register_version("hr.b1.001", "hr", "x", ["d1"]).version
    with pytest.raises(IllegalTransition, match=f"'d1', whose deletion is unfinished \\({state}"):
        reg.activate("hr.b1.001", stale)
    reg.advance_deletion([record], DeletionState.PURGED)
    assert reg.activate("hr.b1.001", stale).status == AdapterStatus.ACTIVE  # re-ingested later


def test_activation_is_blocked_content_wise(reg):
    """A lineage that records content hashes is blocked only by a deletion of that content;
    one that does not is blocked by any deletion of the id."""
    reg.begin_delete(["d1"], "r", content_hashes={"d1": "sha256:old"})
    saw_new = reg.register_version(
        "hr.b2.000", "hr", "x", ["d1"], content_hashes={"d1": "sha256:new"}
    )
    saw_old = reg.register_version(
        "hr.b1.000", "hr", "x", ["d1"], content_hashes={"d1": "sha256:old"}
    )
    unknown = reg.register_version("hr.b3.000", "hr", "x", ["d1"])
    assert reg.activate("hr.b2.000", saw_new.version).status == AdapterStatus.ACTIVE
    for version in (saw_old, unknown):
        with pytest.raises(IllegalTransition, match="whose deletion is unfinished"):
            reg.activate(version.adapter_id, version.version)
    assert reg.lineage_hashes("hr.b2.000", 1) == {"d1": "sha256:new"}
    assert reg.lineage_hashes("hr.b3.000", 1) == {"d1": None}
    assert [v.adapter_id for v in reg.versions_containing("d1", "sha256:old")] == [
        "hr.b1.000",
        "hr.b3.000",
    ]


def test_deletions_only_move_forward_and_each_step_is_audited(reg):
    _active(reg, "hr.b1.000", ["d1"])
    _, (record,) = reg.begin_delete(["d1"], "r")
    assert [r.state for r in reg.advance_deletion([record], DeletionState.REMOVED)] == ["removed"]
    assert reg.advance_deletion([record], DeletionState.DELETING) == []  # never backwards
    assert reg.advance_deletion([record.deletion_id], DeletionState.REMOVED) == []  # idempotent
    reg.advance_deletion([record], DeletionState.PURGED)
    assert reg.unfinished_deletions() == []
    assert reg.deletion("d1").state == DeletionState.PURGED
    actions = [e.action for e in reg.audit_log()]
    assert actions[-2:] == ["delete_removed", "delete_purged"]
    with pytest.raises(NotFound):
        reg.deletion("never")
    with (
        sqlite3.connect(reg.db_path) as conn,
        pytest.raises(sqlite3.IntegrityError, match="only moves forward"),
    ):
        conn.execute("UPDATE deletions SET state = 'deleting'")  # the store refuses it too


def test_replicas_behind_counts_only_live_replicas_below_the_epoch(reg):
    reg.ack_epoch("r1", 3)
    reg.ack_epoch("r2", 5)
    assert reg.replicas_behind(5, live_within_s=60) == [("r1", 3)]
    assert reg.replicas_behind(5, live_within_s=0) == []  # nobody seen that recently: dead
    reg.forget_replica("r1")
    assert reg.replicas_behind(6, live_within_s=60) == [("r2", 5)]


def test_the_barrier_waits_for_the_watcher_and_times_out_loudly(reg):
    _active(reg, "hr.b1.000", ["d1"])
    active = ActiveSet(reg.active_snapshot, lambda keep: [], epoch=reg.epoch)
    watcher = EpochWatcher(
        lambda: active.sync().epoch, reg, replica_id="r1", poll_s=0.02, heartbeat_s=1
    )
    try:
        _, (record,) = reg.begin_delete(["d1"], "r")
        assert wait_for_replicas(reg, record.epoch, timeout_s=5) < 5
        assert active.refs() == set()  # the revoked version left the replica's view first
    finally:
        watcher.stop()
    assert reg.replicas_behind(10**6, live_within_s=60) == []  # a clean stop unregisters

    reg.ack_epoch("stuck", 0)
    started = time.monotonic()
    with pytest.raises(RevocationTimeout, match=r"stuck \(at epoch 0\).*within 0.2 s"):
        wait_for_replicas(reg, reg.epoch(), timeout_s=0.2, poll_s=0.01)
    assert time.monotonic() - started < 2


def _home(tmp_path: Path):
    config = load_config(
        home=str(tmp_path / "home"), environ={}, overrides=["sharding.strategy=sequential"]
    )
    records = [
        {"id": "hr-1", "text": CANARY, "group": "hr"},
        {"id": "hr-2", "text": "Parental leave is 23 weeks.", "group": "hr"},
        {"id": "fin-1", "text": "Invoices are paid in 37 days.", "group": "finance"},
    ]
    ingest_records([RawRecord(f"r{i}", r) for i, r in enumerate(records)], config, embed=None)
    return config


def _storage_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_catalog_removal_rewrites_the_fragment_and_the_text_is_gone(tmp_path):
    config = _home(tmp_path)
    catalog = Catalog(config.storage)
    assert CANARY.encode() in _storage_bytes(Path(config.storage))  # the canary is findable
    catalog.remove(["hr-1", "not-there"])
    assert catalog.ids() == {"hr-2", "fin-1"}
    assert CANARY.encode() not in _storage_bytes(Path(config.storage))  # gone, not hidden
    assert catalog.placements()["hr-2"].startswith("hr.")  # the others keep their shard
    assert catalog.remove(["hr-1"]) == []  # idempotent
    catalog.remove(["hr-2", "fin-1"])
    assert catalog.fragments() == []  # an emptied fragment is deleted


def test_request_delete_refuses_unknown_ids_and_changes_nothing(tmp_path):
    config = _home(tmp_path)
    reg = AdapterRegistry(config.db_path)
    catalog = Catalog(config.storage)
    epoch = reg.epoch()
    with pytest.raises(NotFound, match="'nope' not found"):
        request_delete(reg, catalog, ["hr-1", "nope"], "r", "root")
    assert reg.epoch() == epoch and reg.unfinished_deletions() == []
    request = request_delete(reg, catalog, ["hr-1"], "r", "root")
    assert request.revoked == [] and request.job is not None  # never trained: nothing to revoke
    catalog.remove(["hr-1"])
    repeat = request_delete(reg, catalog, ["hr-1"], "r", "root")  # gone from the catalog, but
    assert repeat.job is None and repeat.job_id == request.job_id  # still in progress: no-op


def test_shards_to_train_can_be_limited_to_the_deleted_documents_shards(tmp_path):
    config = _home(tmp_path)
    reg, catalog = AdapterRegistry(config.db_path), Catalog(config.storage)
    hr = catalog.placements()["hr-1"]
    assert shards_to_train(catalog, reg, only=set()) == []  # a delete of untrained documents
    assert [w.adapter_id for w in shards_to_train(catalog, reg, only={hr})] == [hr]
    assert len(shards_to_train(catalog, reg)) == 2


def test_an_acknowledged_epoch_never_moves_back(reg):
    """Point 6: a late acknowledgement of an older epoch only says the replica is alive."""
    reg.ack_epoch("r1", 5)
    ((_, _, first_seen),) = reg.live_replicas(60)
    time.sleep(0.01)
    reg.ack_epoch("r1", 3)
    assert reg.replicas_behind(5, live_within_s=60) == []
    ((replica, epoch, seen),) = reg.live_replicas(60)
    assert (replica, epoch) == ("r1", 5) and seen > first_seen  # still refreshed
    reg.ack_epoch("r1", 7)
    assert reg.live_replicas(60)[0][1] == 7


def test_every_delete_revokes_whatever_holds_the_id_even_mid_deletion(reg):
    """A DELETE while an earlier deletion of the id is unfinished is no no-op: whatever
    holds the id now (here, a version trained on a replacement) is revoked too."""
    _active(reg, "hr.b1.000", ["d1"])
    job, (old,) = reg.begin_delete(["d1"], "r", content_hashes={"d1": "sha256:old"})
    reg.advance_deletion([old], DeletionState.REMOVED)
    fresh = reg.register_version(
        "hr.b2.000", "hr", "x", ["d1"], content_hashes={"d1": "sha256:new"}
    )
    reg.activate("hr.b2.000", fresh.version)  # the replacement's version: not held back
    epoch = reg.epoch()
    again, records = reg.begin_delete(["d1"], "r", content_hashes={"d1": "sha256:new"})
    assert reg.get_version("hr.b2.000", fresh.version).status == AdapterStatus.REVOKED
    assert reg.epoch() == epoch + 1 and again is not None and again.job_id != job.job_id
    assert [(r.content_hash, r.state) for r in records] == [("sha256:new", "deleting")]
    assert records[0].revoked == [fresh.ref] and records[0].epoch == epoch + 1
    assert reg.deletions("d1")[0].state == DeletionState.REMOVED  # the old one goes on
    # a repeat with no content known (the catalog no longer holds it) still revokes
    third = reg.register_version("hr.b3.000", "hr", "x", ["d1"], content_hashes={"d1": "sha256:x"})
    reg.activate("hr.b3.000", third.version)
    _, records = reg.begin_delete(["d1"], "r")
    assert reg.get_version("hr.b3.000", third.version).status == AdapterStatus.REVOKED
    assert all(third.ref in r.revoked for r in records) and len(records) == 2
    assert len(reg.deletions("d1")) == 2  # no new deletion: the unfinished ones cover it


def test_a_repeat_delete_takes_over_a_deletion_whose_job_ended(reg):
    _active(reg, "hr.b1.000", ["d1"])
    job, (record,) = reg.begin_delete(["d1"], "r", content_hashes={"d1": "sha256:a"})
    same, _ = reg.begin_delete(["d1"], "r")
    assert same is None  # its job is pending: it carries the deletion on
    reg.update_job(job.job_id, JobState.RUNNING)
    reg.update_job(job.job_id, JobState.FAILED, error="retraining failed")
    new, (again,) = reg.begin_delete(["d1"], "r")
    assert new is not None and new.job_id != job.job_id
    assert (again.deletion_id, again.job_id) == (record.deletion_id, new.job_id)


def test_deletions_are_keyed_by_id_and_content_and_kept_as_history(reg):
    _, first = reg.begin_delete(["d1"], "r", content_hashes={"d1": ["sha256:a", "sha256:b"]})
    assert [r.content_hash for r in first] == ["sha256:a", "sha256:b"]
    with sqlite3.connect(reg.db_path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(  # one unfinished deletion per (id, content)
            "INSERT INTO deletions (doc_id, content_hash, state, job_id, actor, epoch, revoked, "
            "requested_at, updated_at) VALUES ('d1', 'sha256:a', 'deleting', 'j', 'a', 0, '[]', "
            "'t', 't')"
        )
    reg.advance_deletion(first, DeletionState.PURGED)
    _, (later,) = reg.begin_delete(["d1"], "r", content_hashes={"d1": "sha256:a"})  # re-ingested
    assert [(d.content_hash, d.state) for d in reg.deletions("d1")] == [
        ("sha256:a", "purged"),
        ("sha256:b", "purged"),
        ("sha256:a", "deleting"),
    ]
    assert reg.deletion("d1") == later


def test_catalog_removal_matches_any_of_several_contents_and_ids_stay_unique(tmp_path):
    config = _home(tmp_path)
    catalog = Catalog(config.storage)
    rows = {r["id"]: r["content_hash"] for r in catalog.read(["id", "content_hash"]).to_pylist()}
    assert catalog.duplicate_ids() == []
    assert catalog.remove(["hr-1", "hr-2"], {"hr-1": ["sha256:other"], "hr-2": []}) == []
    catalog.remove(["hr-1", "hr-2"], {"hr-1": ["sha256:other", rows["hr-1"]], "hr-2": None})
    assert catalog.ids() == {"fin-1"}


def test_a_delete_reads_the_catalog_again_and_deletes_a_replacement_that_landed(tmp_path):
    """Without the ingest lock (the CLI), a replacement written between the DELETE's catalog
    read and its revocation is found on the second read and deleted too."""
    config = _home(tmp_path)
    reg, catalog = AdapterRegistry(config.db_path), Catalog(config.storage)

    def replace(doc_ids):  # what the gateway does for replace: true
        request = request_delete(reg, catalog, doc_ids, "r", "replacer")
        catalog.remove(doc_ids, request.held)
        reg.advance_deletion(request.records, DeletionState.REMOVED)

    class Racing:  # the store, with a replace landing just before the DELETE's revocation
        landed = False

        def __getattr__(self, name):
            return getattr(reg, name)

        def begin_delete(self, *args, **kwargs):
            if not self.landed:
                self.landed = True
                new = {"id": "hr-1", "text": "a replacement", "group": "hr"}
                ingest_records(
                    [RawRecord("r", new)], config, embed=None, audit=reg, replace=replace
                )
            return reg.begin_delete(*args, **kwargs)

    request = request_delete(Racing(), catalog, ["hr-1"], "r", "root")
    (row,) = [r for r in catalog.read(["id", "content_hash"]).to_pylist() if r["id"] == "hr-1"]
    replaced, *deleted = reg.deletions("hr-1")
    assert (replaced.actor, replaced.state) == ("replacer", "removed")
    assert row["content_hash"] != replaced.content_hash  # the replacement's content...
    assert ("root", row["content_hash"], "deleting") in [  # ...is being deleted too
        (d.actor, d.content_hash, d.state) for d in deleted
    ]
    assert request.held == {"hr-1": [row["content_hash"]]}


def test_a_training_run_records_the_text_each_document_had(tiny_config):
    """So a replacement's shard can be published while the old text's deletion still runs."""
    from adapterswap.catalog.documents import content_hash
    from adapterswap.storage.layout import StorageLayout
    from adapterswap.train.job import _register
    from adapterswap.train.plan import ShardWork

    config = tiny_config()
    reg = AdapterRegistry(config.db_path)
    reg.begin_delete(["d1"], "r", content_hashes={"d1": content_hash("old text")})
    work = ShardWork("hr.b0002.000", "hr", ("d1",), ("new text",), "data")
    run = _register(work, config, StorageLayout.from_config(config), reg, "base")
    assert reg.lineage_hashes(work.adapter_id, run.version) == {"d1": content_hash("new text")}
    assert reg.activate(work.adapter_id, run.version).status == AdapterStatus.ACTIVE
