"""Training through Ray Train on the tiny random model, end to end, on a local cluster.

One home is carried through the module, as an operator would: batch 1 trains two shards
concurrently, each with a trainer of its own (each worker crashing once and resuming), then
batch 2 meets a storage failure, a driver crash before publishing, and finally a clean run
(in the training pool, the default path; tests/ray/test_train_pool.py tests the pool's own
failures). Batch 1's files must stay byte-for-byte the same throughout.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from functools import partial
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from support import ingest_groups

from actors.train_launcher import train_shards_one_trainer_each, train_shards_with_ray
from adapterswap.catalog.dataset import Catalog
from adapterswap.models.base import load_base_model
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS, download_version
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import read_manifest
from adapterswap.store.records import JobState
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import NOTHING_TO_TRAIN, run_training
from adapterswap.types import AdapterRef, AdapterStatus

FACTS = {
    "hr": [
        "Parental leave lasts 23 weeks.",
        "Badges are issued by Morwenna Lusk.",
        "The pension provider is Cairnfield.",
    ],
    "finance": [
        "The fiscal year starts on 1 March.",
        "Invoices are paid in 37 days.",
        "Meals are capped at 41 crowns.",
    ],
}


@pytest.fixture(scope="module")
def env(tiny_config, ray_cluster):
    config = tiny_config(
        training={"max_steps": 6, "checkpoint_every": 2}, ray={"train_num_cpus_per_worker": 0.5}
    )
    return config, AdapterRegistry(config.db_path)


def file_hashes(config) -> dict[str, str]:
    root = StorageLayout.from_config(config).adapters()
    return {
        p.relative_to(root.path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root.path).rglob("*"))
        if p.is_file()
    }


def test_batch1_trains_concurrently_and_resumes_after_a_worker_failure(env, tmp_path):
    config, registry = env
    ingest_groups(config, tmp_path, "b1", FACTS, batch="b0001")
    events = []
    # one trainer per shard (the large-shard path); every shard's worker crashes once, at step 3
    crash_once = partial(train_shards_one_trainer_each, fail_once_at_step=3)
    report = run_training(config, registry, train_shards=crash_once, on_progress=events.append)
    assert report.failed == [], report.failed
    assert sorted(t["id"] for t in report.trained) == ["finance.b0001.000", "hr.b0001.000"]

    steps = defaultdict(list)
    for event in events:
        steps[event["shard"]].append(event["step"])
    for shard, seen in steps.items():
        # Crashed at step 3, resumed from the step-2 checkpoint: step 3 twice, step 1 once.
        assert seen.count(1) == 1 and seen.count(3) == 2 and seen[-1] == 6, (shard, seen)
    # Concurrency: each shard's run overlaps the other's.
    order = [e["shard"] for e in events]
    first, last = (
        {s: order.index(s) for s in steps},
        {s: len(order) - 1 - order[::-1].index(s) for s in steps},
    )
    a, b = sorted(steps)
    assert first[a] < last[b] and first[b] < last[a], order

    for shard, group in (("hr.b0001.000", "hr"), ("finance.b0001.000", "finance")):
        active = registry.list_versions(shard, statuses=[AdapterStatus.ACTIVE])
        assert [v.version for v in active] == [1]
        manifest = read_manifest(StorageLayout.from_config(config).version(AdapterRef(shard, 1)))
        assert manifest.doc_ids == sorted(
            Catalog(config.storage).documents_of_shard(shard).column("id").to_pylist()
        )
        assert manifest.group == group and manifest.metrics.steps == 6
        assert registry.lineage(shard, 1) == manifest.doc_ids
    assert not list(
        Path(config.storage, "checkpoints").glob("*/*")
    )  # checkpoints deleted after publish
    job = registry.get_job(report.job)  # the run is a job: state, progress and result recorded
    assert (job.kind, job.state, job.error) == ("train", JobState.SUCCEEDED, None)
    assert job.runner.startswith("process:")
    assert {s: p["step"] for s, p in job.progress.items()} == {
        "hr.b0001.000": 6,
        "finance.b0001.000": 6,
    }
    assert sorted(t["id"] for t in job.result["trained"]) == sorted(steps)


def test_published_adapter_loads_in_peft(env, tmp_path):
    config, _ = env
    layout = StorageLayout.from_config(config)
    local = download_version(layout.version(AdapterRef("hr.b0001.000", 1)), tmp_path / "a")
    base = load_base_model(config.model, config.model_cache_dir).model
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(local))
        adapted_logits = adapted(input_ids=ids).logits
    assert not torch.allclose(base_logits, adapted_logits)


def test_nothing_to_train_is_a_clear_no_op_and_fails_jobs_left_running(env):
    config, registry = env
    dead = registry.create_job("train", "process:elsewhere:1")  # its runner died mid-run
    registry.update_job(dead.job_id, JobState.RUNNING)
    submitted = registry.create_job("train", "ray-actor", actor="root")
    report = run_training(
        config, registry, train_shards=train_shards_with_ray, job_id=submitted.job_id
    )
    assert report.message == NOTHING_TO_TRAIN and report.trained == []
    assert report.job == submitted.job_id
    assert registry.get_job(submitted.job_id).state == JobState.SUCCEEDED
    stale = registry.get_job(dead.job_id)
    assert stale.state == JobState.FAILED and "interrupted" in stale.error


def test_batch2_failures_never_touch_batch1(env, tmp_path, monkeypatch):
    config, registry = env
    before = file_hashes(config)
    ingest_groups(
        config,
        tmp_path,
        "b2",
        {"hr": ["The Skarvik office has 14 desks.", "Visitors sign in at Gullwing Quay."]},
        batch="b0002",
    )
    new = "hr.b0002.000"

    # 1. A storage write failure: the shard's version directory cannot be created.
    layout = StorageLayout.from_config(config)
    blocker = Path(layout.adapters().path, new)
    blocker.write_text("not a directory")
    report = run_training(config, registry, train_shards=train_shards_with_ray)
    assert [f["id"] for f in report.failed] == [new] and report.trained == []
    job = registry.get_job(report.job)
    assert job.state == JobState.FAILED and job.error == f"shards failed: {new}"
    assert registry.get_version(new, 1).status == AdapterStatus.PURGED
    assert not registry.list_versions(new, statuses=[AdapterStatus.ACTIVE])
    blocker.unlink()

    # 2. The driver dies after the files are written, before the store transaction.
    def crash(*args, **kwargs):
        raise SystemExit("driver killed before publishing")

    monkeypatch.setattr(AdapterRegistry, "activate", crash)
    with pytest.raises(SystemExit):
        run_training(config, registry, train_shards=train_shards_with_ray)
    monkeypatch.undo()
    job = registry.list_jobs()[0]
    assert job.state == JobState.FAILED and job.error.startswith("SystemExit")
    assert registry.get_version(new, 2).status == AdapterStatus.TRAINING
    assert (Path(layout.version(AdapterRef(new, 2)).path) / ADAPTER_WEIGHTS).exists()
    assert {v.adapter_id for v in registry.active_adapters(["hr", "finance"])} == {
        "hr.b0001.000",
        "finance.b0001.000",
    }

    # 3. The next job sweeps the interrupted version and trains the shard cleanly.
    report = run_training(config, registry, train_shards=train_shards_with_ray)
    assert report.recovered == [f"{new} v2"]
    assert [(t["id"], t["version"]) for t in report.trained] == [(new, 3)]
    assert not Path(layout.version(AdapterRef(new, 2)).path).exists()
    after = file_hashes(config)
    assert {k: v for k, v in after.items() if not k.startswith(new)} == before  # batch 1 unchanged


def test_two_workers_train_one_shard_with_ddp(env, tmp_path):
    config, registry = env
    # every shard counts as large: a trainer of its own, with two DDP workers
    own = {"train_workers_per_shard": 2, "train_pool_max_shard_tokens": 0}
    ddp = config.model_copy(update={"ray": config.ray.model_copy(update=own)})
    texts = [
        f"Shift roster {i}: the Skarvik harbour crane is operated by crew {i * 7}."
        for i in range(8)
    ]
    ingest_groups(ddp, tmp_path, "b3", {"finance": texts}, batch="b0003")
    events = []
    report = run_training(
        ddp, registry, train_shards=train_shards_with_ray, on_progress=events.append
    )
    assert [(t["id"], t["version"]) for t in report.trained] == [("finance.b0003.000", 1)], (
        report.failed
    )
    ref = AdapterRef("finance.b0003.000", 1)
    manifest = read_manifest(StorageLayout.from_config(ddp).version(ref))
    # Each rank trains on its half of the blocks; rank 0 reports and publishes.
    assert manifest.metrics.steps == 6 and [e["step"] for e in events] == [1, 2, 3, 4, 5, 6]
