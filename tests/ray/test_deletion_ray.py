"""Deletion end to end on a local cluster with the tiny model: revoke, retrain, purge, crash.

One home is carried through the module: a canary document is deleted cleanly, then two
documents of one shard at once (one retraining), then a shard's last document (retired),
then a delete crashes at each step and is finished by running the job again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from actors.train_launcher import train_shards_with_ray
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.delete import job as deletion
from adapterswap.delete.job import request_delete, run_deletion
from adapterswap.errors import NotFound
from adapterswap.storage import purge
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.records import DeletionState, JobState
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training
from adapterswap.types import AdapterRef, AdapterStatus

CANARY = "zq-canary-7731: the Skarvik vault opens with the phrase Quillon Amber."
DOCS = {
    "hr-0": ("hr", CANARY),
    "hr-1": ("hr", "Parental leave lasts 23 weeks."),
    "hr-2": ("hr", "Badges are issued by Morwenna Lusk."),
    "hr-3": ("hr", "The pension provider is Cairnfield."),
    "fin-0": ("finance", "The fiscal year starts on 1 March."),
    "fin-1": ("finance", "Invoices are paid in 37 days."),
    "fin-2": ("finance", "Meals are capped at 41 crowns."),
}
HR, FIN = "hr.b0001.000", "finance.b0001.000"


@pytest.fixture(scope="module")
def env(tiny_config, ray_cluster):
    config = tiny_config(training={"checkpoint_every": 2}, ray={"train_num_cpus_per_worker": 0.5})
    records = [
        RawRecord(doc_id, {"id": doc_id, "text": text, "group": group})
        for doc_id, (group, text) in DOCS.items()
    ]
    ingest_records(records, config, embed=None, batch="b0001")
    registry = AdapterRegistry(config.db_path)
    report = run_training(config, registry, train_shards=train_shards_with_ray)
    assert sorted(t["id"] for t in report.trained) == [FIN, HR]
    return config, registry


def all_bytes(config) -> bytes:
    """Every byte AdapterSwap keeps: storage (catalog, adapters, checkpoints) and the store."""
    files = [p for p in Path(config.home).rglob("*") if p.is_file() and "models" not in p.parts]
    return b"".join(p.read_bytes() for p in sorted(files))


def hashes(config, adapter_id: str) -> dict[str, str]:
    root = Path(StorageLayout.from_config(config).adapters().path, adapter_id)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def active_version(registry, adapter_id: str) -> int | None:
    active = registry.list_versions(adapter_id, statuses=[AdapterStatus.ACTIVE])
    return active[0].version if active else None


def delete(config, registry, *doc_ids: str):
    return request_delete(registry, Catalog(config.storage), list(doc_ids), "test", "root")


def test_a_deleted_document_is_revoked_retrained_out_and_purged_everywhere(env):
    config, registry = env
    finance_before = hashes(config, FIN)
    assert CANARY.encode() in all_bytes(config)
    request = delete(config, registry, "hr-0")
    assert request.revoked == [{"id": HR, "version": 1}]
    assert active_version(registry, HR) is None  # revoked at once, before any retraining

    report = run_deletion(
        config, registry, train_shards=train_shards_with_ray, job_id=request.job_id
    )
    assert report.documents == ["hr-0"] and report.purged == [f"{HR}@v1"]
    assert active_version(registry, HR) == 2
    assert registry.lineage(HR, 2) == ["hr-1", "hr-2", "hr-3"]
    assert registry.get_version(HR, 1).status == AdapterStatus.PURGED
    assert not Path(StorageLayout.from_config(config).version(AdapterRef(HR, 1)).path).exists()
    assert not list(Path(config.storage, "checkpoints").glob(f"{HR}-v1*"))
    assert CANARY.encode() not in all_bytes(config)  # catalog, adapters, store: nowhere
    assert hashes(config, FIN) == finance_before and active_version(registry, FIN) == 1
    assert registry.deletion("hr-0").state == DeletionState.PURGED
    job = registry.get_job(request.job_id)
    assert job.state == JobState.SUCCEEDED and job.result["purged"] == [f"{HR}@v1"]
    steps = [e.action for e in registry.audit_log(limit=1000) if e.details.get("doc_id") == "hr-0"]
    assert steps == ["delete_requested", "delete_removed", "delete_retrained", "delete_purged"]
    with pytest.raises(NotFound):  # finished: the id is unknown now
        delete(config, registry, "hr-0")


def test_several_documents_of_a_shard_retrain_it_once_and_its_last_one_retires_it(env):
    config, registry = env
    request = delete(config, registry, "hr-1", "hr-2")
    assert request.revoked == [{"id": HR, "version": 2}]
    report = run_deletion(
        config, registry, train_shards=train_shards_with_ray, job_id=request.job_id
    )
    assert [(t["id"], t["version"]) for t in report.training["trained"]] == [(HR, 3)]
    assert registry.lineage(HR, 3) == ["hr-3"]

    run_deletion(
        config,
        registry,
        train_shards=train_shards_with_ray,
        job_id=delete(config, registry, "hr-3").job_id,
    )
    assert active_version(registry, HR) is None  # retired: no version, no empty adapter
    assert {v.status for v in registry.list_versions(HR)} == {AdapterStatus.PURGED}
    adapters = StorageLayout.from_config(config).adapters()
    assert not Path(adapters.path, HR).exists() or not hashes(config, HR)


def test_a_delete_crashing_at_each_step_is_finished_by_running_the_job_again(env, monkeypatch):
    config, registry = env
    request = delete(config, registry, "fin-0")
    crashes = {
        "removing": (Catalog, "remove", DeletionState.DELETING),
        "retraining": (deletion, "train_changed_shards", DeletionState.REMOVED),
        "purging": (purge, "delete_dir", DeletionState.RETRAINED),
    }
    for step, (owner, name, state_after) in crashes.items():
        real = getattr(owner, name)

        def crash(*args, _real=real, _step=step, **kwargs):
            if _step == "purging":
                _real(*args, **kwargs)  # the files go, then the process dies before the store
            raise SystemExit(f"killed while {_step}")

        monkeypatch.setattr(owner, name, crash)
        with pytest.raises(SystemExit, match=step):
            run_deletion(
                config,
                registry,
                train_shards=train_shards_with_ray,
                job_id=request.job_id if step == "removing" else None,
            )
        monkeypatch.undo()
        assert registry.deletion("fin-0").state == state_after, step
        assert active_version(registry, FIN) in (None, 2)  # v1 (which saw fin-0) never again
        assert registry.list_jobs()[0].state == JobState.FAILED

    report = run_deletion(config, registry, train_shards=train_shards_with_ray)
    assert report.documents == ["fin-0"]
    assert registry.deletion("fin-0").state == DeletionState.PURGED
    assert active_version(registry, FIN) == 2 and registry.lineage(FIN, 2) == ["fin-1", "fin-2"]
    assert registry.get_version(FIN, 1).status == AdapterStatus.PURGED
    assert not Path(StorageLayout.from_config(config).version(AdapterRef(FIN, 1)).path).exists()
    assert (
        run_deletion(config, registry, train_shards=train_shards_with_ray).documents == []
    )  # nothing left: a no-op
