"""The training pool on a local Ray cluster, on the tiny random model: one worker takes three
shards in turn (a, b, c). A worker dying inside b restarts the group and b resumes from its
own checkpoint; a shard whose training fails fails alone while the worker goes on; and the
pool writes the same adapter bytes as a trainer of its own per shard."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from functools import partial
from pathlib import Path

import pytest
from support import ingest_groups

from actors.train_launcher import train_shards_one_trainer_each
from actors.train_pool import train_shards_in_pool
from adapterswap.catalog.dataset import Catalog
from adapterswap.models.base import base_model_identity
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import read_manifest
from adapterswap.store.records import JobState
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training
from adapterswap.train.plan import shards_to_train
from adapterswap.train.shard import make_shard_run
from adapterswap.types import AdapterRef, AdapterStatus

GROUPS = {
    "a": ["The Skarvik office has 14 desks.", "Visitors sign in at Gullwing Quay."],
    "b": ["Invoices are paid in 37 days.", "Meals are capped at 41 crowns."],
    "c": ["Badges are issued by Morwenna Lusk.", "The pension provider is Cairnfield."],
}
A, B, C = (f"{g}.b0001.000" for g in GROUPS)


@pytest.fixture
def home(tiny_config, ray_cluster, tmp_path):
    config = tiny_config(
        training={"max_steps": 6, "checkpoint_every": 2},
        ray={"train_pool_workers": 1, "train_num_cpus_per_worker": 1},
    )
    ingest_groups(config, tmp_path, "p", GROUPS, batch="b0001")
    return config, AdapterRegistry(config.db_path)


def steps_by_shard(events: list[dict]) -> dict[str, list[int]]:
    steps = defaultdict(list)
    for event in events:
        steps[event["shard"]].append(event["step"])
    return dict(steps)


def test_a_worker_dying_mid_queue_resumes_its_shard_and_retrains_nothing(home):
    config, registry = home
    events: list[dict] = []
    crash = partial(train_shards_in_pool, crash_once_at=(B, 3))  # after a, inside b
    report = run_training(config, registry, train_shards=crash, on_progress=events.append)
    assert report.failed == [] and [t["id"] for t in report.trained] == [A, B, C]
    # b died at step 3 and resumed from its step-2 checkpoint; a and c trained once each.
    assert steps_by_shard(events) == {
        A: [1, 2, 3, 4, 5, 6],
        B: [1, 2, 3, 3, 4, 5, 6],
        C: [1, 2, 3, 4, 5, 6],
    }
    assert [e["shard"] for e in events] == [A] * 6 + [B] * 7 + [C] * 6
    for shard in (A, B, C):  # published exactly once, whole
        assert [v.version for v in registry.list_versions(shard)] == [1]
        assert registry.get_version(shard, 1).status == AdapterStatus.ACTIVE
        manifest = read_manifest(StorageLayout.from_config(config).version(AdapterRef(shard, 1)))
        assert manifest.metrics.steps == 6
    assert list(Path(config.storage, "checkpoints").iterdir()) == []  # nor the pool's run dir


def test_a_shard_whose_training_fails_fails_alone_and_its_worker_goes_on(home):
    config, registry = home
    layout = StorageLayout.from_config(config)
    Path(layout.adapters().path).mkdir(parents=True, exist_ok=True)
    Path(layout.adapters().path, A).write_text("not a directory")  # a's files cannot be written
    events: list[dict] = []
    report = run_training(
        config, registry, train_shards=train_shards_in_pool, on_progress=events.append
    )
    assert [t["id"] for t in report.trained] == [B, C]
    [failed] = report.failed
    assert failed["id"] == A
    assert failed["error"].startswith("NotADirectoryError: [Errno 20] Not a directory: ")
    assert failed["error"].endswith(f"/adapters/{A}/v1'")
    job = registry.get_job(report.job)
    assert job.state == JobState.FAILED and job.error == f"shards failed: {A}"
    assert job.result["failed"][0]["error"] == failed["error"]
    assert registry.get_version(A, 1).status == AdapterStatus.PURGED
    # The one worker trained a to its last step, failed it, then took b and c.
    assert [e["shard"] for e in events] == [A] * 6 + [B] * 6 + [C] * 6


def test_the_pool_writes_the_bytes_of_a_trainer_of_its_own(home, tmp_path):
    config, registry = home
    base = base_model_identity(config.model, config.model_cache_dir)
    work = shards_to_train(Catalog(config.storage), registry)
    runs = [make_shard_run(w, 1, config, base) for w in work]
    alone = [dataclasses.replace(r, storage_uri=str(tmp_path / "alone")) for r in runs[1:]]
    pooled = train_shards_in_pool(runs, config)  # c is trained third on the worker's model
    own = train_shards_one_trainer_each(alone, config)
    assert [o.error for o in pooled + own] == [None] * 5
    for run in runs[1:]:
        mine = Path(StorageLayout.from_uri(run.storage_uri).version(run.ref).path)
        theirs = Path(StorageLayout.from_uri(str(tmp_path / "alone")).version(run.ref).path)
        assert (mine / ADAPTER_WEIGHTS).read_bytes() == (theirs / ADAPTER_WEIGHTS).read_bytes()
