"""The training pool without Ray: the shard queue's rules, a pool worker training shard after
shard on one base model (the same bytes as a model of its own per shard), its checkpoints in
the shard's own directory, and which shards go to the pool with how many workers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from support import ingest_groups

from adapterswap.catalog.dataset import Catalog
from adapterswap.models.base import base_model_identity
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training
from adapterswap.train.launcher import ShardOutcome, pool_size, split_for_pool
from adapterswap.train.plan import shards_to_train
from adapterswap.train.pool_worker import (
    COMPLETE,
    PoolWorker,
    restore_shard_checkpoint,
    save_shard_checkpoint,
)
from adapterswap.train.shard import finish_shard_run, make_shard_run, start_shard_trainer
from adapterswap.train.shard_queue import ShardQueue

GROUPS = {
    "a": ["The Skarvik office has 14 desks.", "Visitors sign in at Gullwing Quay."],
    "b": ["Invoices are paid in 37 days.", "Meals are capped at 41 crowns."],
    "c": ["Badges are issued by Morwenna Lusk.", "The pension provider is Cairnfield."],
}


# --- the queue ---------------------------------------------------------------------------


def test_queue_hands_shards_out_in_order_each_to_one_rank_at_a_time():
    queue = ShardQueue(["a", "b", "c"], max_interruptions=2)
    assert [queue.take(0), queue.take(1)] == ["a", "b"]
    assert queue.in_flight() == {0: "a", 1: "b"}
    queue.finish(1, "b")
    assert queue.take(1) == "c"  # a is still rank 0's: never handed to another rank
    queue.finish(0, "a", "FloatingPointError: non-finite loss nan at step 2")
    queue.finish(1, "c")
    assert queue.take(0) is None and queue.take(1) is None
    assert queue.outcomes() == {
        "a": "FloatingPointError: non-finite loss nan at step 2",
        "b": None,
        "c": None,
    }


def test_a_failed_shard_is_never_handed_out_again():
    queue = ShardQueue(["a", "b"], max_interruptions=2)
    queue.finish(0, queue.take(0), "RuntimeError: boom")
    assert queue.take(0) == "b"
    queue.finish(0, "b")
    assert queue.take(0) is None and queue.outcomes()["a"] == "RuntimeError: boom"


def test_after_a_restart_each_rank_gets_back_the_shard_it_had_in_flight():
    queue = ShardQueue(["a", "b", "c", "d"], max_interruptions=2)
    queue.take(0), queue.take(1)
    queue.finish(0, "a")
    assert queue.take(0) == "c"
    # The group restarted: both ranks ask again while holding c and b.
    assert queue.take(1) == "b" and queue.take(0) == "c"
    queue.finish(1, "b")
    assert queue.take(1) == "d"
    assert queue.outcomes() == {"a": None, "b": None}  # a stays done: not trained again


def test_a_shard_interrupted_too_often_fails_and_its_rank_moves_on():
    queue = ShardQueue(["a", "b"], max_interruptions=1)
    assert queue.take(0) == "a"
    assert queue.take(0) == "a"  # first restart: resumed
    assert queue.take(0) == "b"  # second: a fails, rank 0 takes the next shard
    assert queue.outcomes()["a"] == (
        "WorkerCrashed: the training worker stopped 2 times while training this shard "
        "(training.max_failures is 1)"
    )


def test_abandon_fails_every_shard_not_finished_and_finish_checks_the_holder():
    queue = ShardQueue(["a", "b", "c"], max_interruptions=2)
    queue.take(0), queue.take(1)
    queue.finish(0, "a")
    with pytest.raises(ValueError, match="rank 0 does not hold shard 'b'"):
        queue.finish(0, "b")
    queue.abandon("training pool failed: boom")
    assert queue.outcomes() == {
        "a": None,
        "b": "training pool failed: boom",
        "c": "training pool failed: boom",
    }
    assert queue.take(0) is None
    with pytest.raises(ValueError, match="distinct"):
        ShardQueue(["a", "a"], max_interruptions=1)


# --- pool size and the split ---------------------------------------------------------------


def test_pool_size_fits_the_cluster_and_never_exceeds_the_shards(tiny_config):
    config = tiny_config(ray={"train_num_cpus_per_worker": 0.5})
    assert pool_size(config, 100, {"CPU": 2.0}) == 4
    assert pool_size(config, 3, {"CPU": 2.0}) == 3
    assert pool_size(config, 100, {"CPU": 0.25}) == 1
    assert pool_size(config, 100, {"CPU": 8.0, "GPU": 2.0}) == 2  # use_gpu auto: one GPU each
    slots = tiny_config(
        ray={"train_num_cpus_per_worker": 0.25, "train_resources_per_worker": {"slot": 1}}
    )
    assert pool_size(slots, 100, {"CPU": 8.0, "slot": 3.0}) == 3  # as many as the slots
    assert pool_size(slots, 100, {"CPU": 8.0}) == 1  # none known yet: one, which waits
    fixed = tiny_config(ray={"train_pool_workers": 3})
    assert pool_size(fixed, 100, {"CPU": 64.0}) == 3 and pool_size(fixed, 2, {"CPU": 64.0}) == 2


def test_shards_above_the_size_get_a_trainer_of_their_own(runs):
    big = dataclasses.replace(runs[1], texts=("word " * 400,))
    pooled, own = split_for_pool([runs[0], big, runs[2]], max_shard_tokens=200)
    assert [r.adapter_id for r in pooled] == [runs[0].adapter_id, runs[2].adapter_id]
    assert own == [big]
    assert split_for_pool(runs, 0) == ([], runs)


# --- a pool worker -------------------------------------------------------------------------


# LoRA dropout on: its masks must come from the shard's seed, not from what ran before.
SETTINGS = {"training": {"max_steps": 4, "checkpoint_every": 2}, "lora": {"dropout": 0.1}}


@pytest.fixture
def home(tiny_config, tmp_path):
    config = tiny_config(**SETTINGS)
    ingest_groups(config, tmp_path, "p", GROUPS, batch="b0001")
    return config


@pytest.fixture
def runs(home):
    work = shards_to_train(Catalog(home.storage), AdapterRegistry(home.db_path))
    base = base_model_identity(home.model, home.model_cache_dir)
    return [make_shard_run(w, 1, home, base) for w in work]


def pool_in_process(runs, config, *, on_progress=None):
    """``train_shards_in_pool``'s contract with one worker, in this process."""
    worker = PoolWorker(runs[0].model, runs[0].cache_dir, torch.device("cpu"))
    outcomes = []
    for run in runs:
        try:
            worker.train(
                run,
                lambda info, run=run: (
                    on_progress
                    and on_progress({"shard": run.adapter_id, **dataclasses.asdict(info)})
                ),
            )
            outcomes.append(ShardOutcome(run, None))
        except Exception as exc:  # noqa: BLE001 - the shard fails alone
            outcomes.append(ShardOutcome(run, f"{type(exc).__name__}: {exc}"))
    return outcomes


def fresh_model_per_shard(runs, config, *, on_progress=None):
    """Today's one-trainer-per-shard path, in this process: a base model loaded per shard."""
    for run in runs:
        trainer, _ = start_shard_trainer(run, torch.device("cpu"))
        while not trainer.done:
            trainer.step()
        finish_shard_run(run, trainer)
    return [ShardOutcome(run, None) for run in runs]


def adapter_bytes(storage_uri: str) -> dict[str, bytes]:
    """{adapter id: its adapter weights file's bytes} of every version under ``storage_uri``."""
    root = Path(StorageLayout.from_uri(storage_uri).adapters().path)
    return {
        p.parent.parent.name: p.read_bytes() for p in sorted(root.glob(f"*/*/{ADAPTER_WEIGHTS}"))
    }


def test_a_pool_worker_writes_the_bytes_a_model_of_its_own_writes(tiny_config, tmp_path, home):
    other = tiny_config(**SETTINGS)
    ingest_groups(other, tmp_path, "p", GROUPS, batch="b0001")
    events = []
    pooled = run_training(
        home, AdapterRegistry(home.db_path), train_shards=pool_in_process, on_progress=events.append
    )
    alone = run_training(other, AdapterRegistry(other.db_path), train_shards=fresh_model_per_shard)
    assert len(pooled.trained) == len(alone.trained) == 3 and not pooled.failed
    # The third shard was trained after two others on the same base model: same bytes.
    assert adapter_bytes(home.storage) == adapter_bytes(other.storage)
    assert [e["shard"] for e in events] == [
        s for s in sorted(adapter_bytes(home.storage)) for _ in range(4)
    ]


def test_a_shard_failing_in_a_worker_leaves_the_base_model_for_the_next(home, runs):
    worker = PoolWorker(runs[0].model, runs[0].cache_dir, torch.device("cpu"))
    as_loaded = {k: v.clone() for k, v in worker.loaded.model.state_dict().items()}

    def fail_at_2(info):
        if info.step == 2:
            raise FloatingPointError("non-finite loss nan at step 2")

    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2"):
        worker.train(runs[0], fail_at_2)
    after = worker.loaded.model.state_dict()
    assert list(after) == list(as_loaded)  # no LoRA layer left behind
    assert all(torch.equal(after[k], v) for k, v in as_loaded.items())
    with pytest.raises(ValueError, match="names another base model than the training pool"):
        worker.train(dataclasses.replace(runs[1], cache_dir="/elsewhere"), lambda info: None)


def test_a_shard_resumes_from_its_own_checkpoint_to_the_same_adapter(home, runs, tmp_path):
    run = runs[0]
    worker = PoolWorker(run.model, run.cache_dir, torch.device("cpu"))

    def die_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt  # the worker's death, after the step-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        worker.train(run, die_at_3)
    steps = []
    worker.train(run, lambda info: steps.append(info.step))
    assert steps == [3, 4]  # resumed after step 2: steps 1 and 2 are not trained again
    alone = dataclasses.replace(run, storage_uri=str(tmp_path / "alone"))
    fresh_model_per_shard([alone], home)
    assert adapter_bytes(home.storage) == adapter_bytes(alone.storage_uri)


def test_only_the_newest_complete_checkpoint_is_kept_and_used(home, runs):
    run = runs[0]
    loc = StorageLayout.from_config(home).checkpoints(run.ref)
    trainer, _ = start_shard_trainer(run, torch.device("cpu"))
    trainer.step()
    save_shard_checkpoint(loc, trainer)
    trainer.step()
    save_shard_checkpoint(loc, trainer)
    assert sorted(p.name for p in Path(loc.path).iterdir()) == ["step-00000002"]
    # A save cut short before its mark: the complete one before it is what resumes.
    half = Path(loc.path, "step-00000003")
    half.mkdir()
    (half / "lora_weights.safetensors").write_bytes(b"torn")
    fresh, _ = start_shard_trainer(run, torch.device("cpu"))
    assert restore_shard_checkpoint(loc, fresh) == 2
    assert (Path(loc.path, "step-00000002") / COMPLETE).exists()
    other = StorageLayout.from_config(home).checkpoints(runs[1].ref)
    assert restore_shard_checkpoint(other, fresh) == 0  # another shard's: none of its own
