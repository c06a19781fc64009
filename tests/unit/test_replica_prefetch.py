"""A model replica's tiered adapters against the real store and storage: a version revoked
while it is prefetched is never served, and an adapter whose files are corrupt or missing
fails only the requests that need it, is read once per backoff, and reaches operators
(metric, heartbeat, ``adapterswap status``)."""

from __future__ import annotations

import threading

import pytest
from support import FIN_TEXTS, HR_TEXTS, publish_random_adapter

from actors.metrics import ServeMetrics
from adapterswap.engine.adapter_tiers import LOAD_FAILED
from adapterswap.engine.epoch_watch import EpochWatcher
from adapterswap.engine.replica import InferenceJob, ModelReplica
from adapterswap.engine.requests import GenerationResult, SamplingParams
from adapterswap.errors import AdapterLoadFailed, StaleMixture
from adapterswap.ops.status import collect_status, format_status
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture
def world(tiny_config, embed):
    config = tiny_config()
    registry = AdapterRegistry(config.db_path)
    refs = {
        group: publish_random_adapter(config, registry, embed, f"{group}.b1.000", group, texts, i)
        for i, (group, texts) in enumerate(
            [("hr", HR_TEXTS), ("finance", FIN_TEXTS), ("legal", HR_TEXTS)]
        )
    }
    replica = ModelReplica(
        config,
        registry.active_snapshot,
        epoch=registry.epoch,
        changes=registry.active_changes,
    )
    yield config, registry, refs, replica
    replica.close()


def job(ref) -> InferenceJob:
    return InferenceJob(prompt="Hello there", params=PARAMS, mixture=((ref, 1.0),))


def counted_loads(replica, monkeypatch, gate: threading.Event | None = None) -> list:
    """Count (and, with ``gate``, hold until it is set) every read of an adapter's files."""
    reads, load = [], replica.source.load

    def reading(ref):
        reads.append(ref)
        if gate is not None:
            assert gate.wait(30)
        return load(ref)

    monkeypatch.setattr(replica.source, "load", reading)
    return reads


def test_a_version_revoked_while_it_is_prefetched_is_never_served(world, monkeypatch):
    config, registry, refs, replica = world
    hr, fin = refs["hr"], refs["finance"]
    release = threading.Event()
    reads = counted_loads(replica, monkeypatch, release)
    outcome, finished = [], threading.Event()
    replica.submit(job(hr), lambda o: (outcome.append(o), finished.set()))
    while not reads:  # the prefetch has started and is held in storage
        assert not finished.wait(0.01)
    registry.revoke(hr.id, hr.version, reason="delete")
    acknowledged = replica.sync()  # what the epoch watcher acknowledges
    assert acknowledged == registry.epoch()
    release.set()
    assert finished.wait(30)
    (result,) = outcome
    with pytest.raises(StaleMixture, match="not active"):
        raise result
    assert hr not in replica.tiers.host and hr not in replica.bank
    assert replica.engine.stats.tokens_sampled == 0  # no token sampled with it
    (other,) = replica.generate([job(fin)])  # the replica serves on
    assert isinstance(other, GenerationResult) and other.completion_tokens == 4
    assert hr not in replica.tiers.host and replica.tiers.host.used > 0


def test_corrupt_or_missing_files_fail_only_their_requests_and_reach_status(world, monkeypatch):
    config, registry, refs, replica = world
    layout = StorageLayout.from_config(config)
    corrupt, missing = layout.version(refs["finance"]), layout.version(refs["legal"])
    weights = corrupt.child(ADAPTER_WEIGHTS)
    with weights.fs.open_output_stream(weights.path) as out:
        out.write(b"\x00garbage, not safetensors")
    missing.fs.delete_file(missing.child(ADAPTER_WEIGHTS).path)
    reads = counted_loads(replica, monkeypatch)

    good, *bad = replica.generate(
        [job(refs["hr"]), job(refs["finance"]), job(refs["legal"]), job(refs["finance"])]
    )
    assert isinstance(good, GenerationResult) and good.completion_tokens == 4
    for failed in bad:  # a 500 that names nothing
        assert isinstance(failed, AdapterLoadFailed) and str(failed) == LOAD_FAILED
    (again,) = replica.generate([job(refs["finance"])])  # within the backoff: no new read
    assert isinstance(again, AdapterLoadFailed)
    assert sorted(reads) == sorted(refs.values())  # each version read once

    metrics, failures = ServeMetrics(), []
    monkeypatch.setattr(metrics.load_failures, "inc", lambda n, tags=None: failures.append(n))
    metrics.record_tiers(replica.tiers.stats())
    assert sum(failures) == 2

    watcher = EpochWatcher(
        replica.sync,
        registry,
        replica_id="r1",
        poll_s=3600,
        heartbeat_s=3600,
        report=replica.report,
    )
    try:
        reported = registry.replica_details(60)["r1"]["failed_loads"]
        assert [(f["adapter_id"], f["attempts"]) for f in reported] == [
            ("finance.b1.000", 1),
            ("legal.b1.000", 1),
        ]
        assert "FileNotFoundError" in reported[1]["error"]
        status = collect_status(config, registry)
        (row,) = status["replicas"]
        assert row["failed_loads"] == reported
        text = format_status(status)
        assert "    failed to load finance.b1.000 v1 (1 attempt): " in text
        assert "    failed to load legal.b1.000 v1 (1 attempt): FileNotFoundError" in text
    finally:
        watcher.stop()


def test_the_replica_syncs_by_deltas_once_it_holds_an_epoch(world, monkeypatch):
    config, registry, refs, replica = world
    replica.sync()  # the first view: a full snapshot
    snapshots = []
    monkeypatch.setattr(replica.active, "_snapshot", lambda: snapshots.append(1) or ([], 0))
    (warm,) = replica.generate([job(refs["hr"])])
    assert isinstance(warm, GenerationResult) and refs["hr"] in replica.bank
    registry.revoke(refs["hr"].id, refs["hr"].version, reason="delete")
    assert replica.sync() == registry.epoch()
    assert snapshots == []  # the delta said what left: no full read
    assert refs["hr"] not in replica.bank and refs["hr"] not in replica.active.refs()
    assert refs["finance"] in replica.active.refs()
