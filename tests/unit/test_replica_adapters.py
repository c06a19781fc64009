"""A replica's adapters: loaded from storage by (id, version), synced to the store's epoch."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from support import private_copy, untrained_manifest

from adapterswap.compose.bank import AdapterBank
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.errors import BaseModelMismatch, NotFound, StaleMixture
from adapterswap.route.active_set import ActiveSet
from adapterswap.route.stats import compute_shard_stats, save_shard_stats
from adapterswap.storage.artifacts import write_adapter_version
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import BaseModelId
from adapterswap.store.registry import AdapterRegistry
from adapterswap.types import AdapterRef

TARGETS = ["q_proj", "v_proj"]


def publish(storage, registry, embed, tiny, adapter_id, group, seed):
    """Train nothing: a random (B != 0) LoRA stands in for a trained one, published for real."""
    torch.manual_seed(seed)
    model = private_copy(tiny).model
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    version = registry.register_version(adapter_id, group, "x", [f"{adapter_id}-doc"]).version
    stats = compute_shard_stats(
        [f"notes about {group} number {seed}"], embed, "embedded:all-MiniLM-L6-v2"
    )
    ref = AdapterRef(adapter_id, version)
    manifest = untrained_manifest(
        ref, group, [f"{adapter_id}-doc"], BaseModelId(id="tiny-random", hash="H")
    )
    write_adapter_version(storage.version(ref), peft_model, save_shard_stats(stats), manifest)
    registry.activate(adapter_id, version)
    return ref


@pytest.fixture
def world(tmp_path, embed, tiny):
    storage = StorageLayout.from_uri(str(tmp_path / "storage"))
    registry = AdapterRegistry(tmp_path / "store.sqlite")
    hr = publish(storage, registry, embed, tiny, "hr.b1.000", "hr", 1)
    fin = publish(storage, registry, embed, tiny, "finance.b1.000", "finance", 2)
    base = private_copy(tiny).model
    bank = AdapterBank(base, TARGETS, r_max=4, cache_bytes=10**8)
    return storage, registry, bank, hr, fin


def test_loads_from_storage_into_the_bank(world):
    storage, _, bank, hr, _ = world
    source = StorageAdapterSource(storage, base_model_hash="H")
    bank.get_or_load(hr, source.load)
    assert hr in bank and bank.misses == 1
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base_out = bank.model(input_ids=ids).logits
        with bank.mixture([[(hr, 1.0)]]):
            adapted = bank.model(input_ids=ids).logits
    assert not torch.allclose(base_out, adapted)
    assert source.router_stats(hr).n_chunks == 1


def test_refuses_an_adapter_of_another_base_model(world):
    storage, _, bank, hr, _ = world
    with pytest.raises(
        BaseModelMismatch, match="hr.b1.000 v1 was trained on base model tiny-random"
    ):
        bank.get_or_load(hr, StorageAdapterSource(storage, base_model_hash="OTHER").load)
    assert hr not in bank


def test_visibility_and_not_found_look_the_same(world):
    _, registry, bank, hr, fin = world
    active = ActiveSet(registry.active_snapshot, bank.evict_all_except)
    assert active.sync().epoch == registry.epoch()
    assert [v.adapter_id for v in active.visible(["hr"])] == ["hr.b1.000"]
    assert active.resolve("hr.b1.000", ["hr"]).ref == hr
    with pytest.raises(NotFound) as hidden:
        active.resolve("finance.b1.000", ["hr"])
    with pytest.raises(NotFound) as missing:
        active.resolve("nope.b1.000", ["hr"])
    assert str(hidden.value).replace("finance.b1.000", "X") == str(missing.value).replace(
        "nope.b1.000", "X"
    )


def test_revocation_is_dropped_before_the_epoch_is_acknowledged(world):
    storage, registry, bank, hr, fin = world
    source = StorageAdapterSource(storage, base_model_hash="H")
    snapshots = []

    def snapshot():
        snapshots.append(registry.epoch())
        return registry.active_snapshot()

    active = ActiveSet(snapshot, bank.evict_all_except, epoch=registry.epoch)
    active.sync()
    bank.get_or_load(hr, source.load)
    bank.get_or_load(fin, source.load)
    registry.revoke(hr.id, hr.version, reason="delete")
    result = active.sync()
    assert result.epoch == registry.epoch() and result.dropped == (hr,)
    assert hr not in bank and fin in bank
    with pytest.raises(NotFound):
        active.resolve("hr.b1.000", ["hr"])
    assert active.sync().dropped == ()  # nothing new: no work
    assert len(snapshots) == 2  # only the two syncs that found a new epoch read the versions


def test_a_slow_load_does_not_hold_the_bank_and_an_eviction_during_it_wins(world):
    storage, _, bank, hr, fin = world
    source = StorageAdapterSource(storage, base_model_hash="H")
    started, release, reads = threading.Event(), threading.Event(), []

    def slow(ref):
        reads.append(ref)
        started.set()
        release.wait(30)  # storage that takes its time
        return source.load(ref)

    outcome = {}

    def load():
        try:
            outcome["slot"] = bank.get_or_load(hr, slow)
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            outcome["error"] = exc

    loaders = [threading.Thread(target=load) for _ in range(2)]  # two misses on one ref
    for thread in loaders:
        thread.start()
    assert started.wait(30)
    bank.get_or_load(fin, source.load)  # the bank is not held by the slow load...
    begun = time.monotonic()
    assert bank.evict_all_except([fin]) == []  # ...nor is eviction, which cancels the load
    assert time.monotonic() - begun < 0.5
    release.set()
    for thread in loaders:
        thread.join(30)
    assert reads == [hr]  # read once for both
    assert isinstance(outcome["error"], StaleMixture) and "slot" not in outcome
    assert hr not in bank and bank.loaded() == [fin]
    assert bank.get_or_load(hr, source.load) >= 0  # asked again later, it loads
