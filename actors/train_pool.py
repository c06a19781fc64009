"""Ray Train launch of many shards: one long-lived worker group that takes shards from a queue.

Starting a ``TorchTrainer`` costs ~18-20 s here, more than a small shard's training. The
pool starts one trainer with W workers (``adapterswap.train.launcher.pool_size``); each
worker loads the base model once and trains shard after shard
(:class:`~adapterswap.train.pool_worker.PoolWorker`), taking each from a
:class:`~adapterswap.train.shard_queue.ShardQueue` held by a CPU-less actor.

- No shared gradients: the workers form Ray Train's process group, but nothing is wrapped
  for DDP and nothing is all-reduced; each worker trains its shard alone, on its shard's
  rows alone (shards are independent models, and may belong to different access groups).
- A shard whose training raises fails alone: its worker reports the error to the queue
  (the job's report carries it) and takes the next shard.
- A worker that dies restarts the whole group (``FailureConfig``: ``training.max_failures``
  per worker). Each rank then gets back the shard it had in flight and resumes it from that
  shard's own checkpoint in ``StorageLayout.checkpoints(ref)``; finished shards stay done.
- Progress events are those of a trainer of its own: ``{"shard", "step", "max_steps",
  "loss", ...}`` per step.
- The job publishes every written shard once the pool has finished, one store transaction
  per shard, exactly as for shards trained alone: the ``ShardLauncher`` contract (one
  outcome per run) stays the one the deletion job and the tests' launchers keep. The price:
  a shard done early serves only when the pool ends (a pool of small shards ends in minutes),
  and a driver that dies mid-pool leaves its written versions ``training``, to be swept and
  retrained by the next job, as before the pool.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from actors.train_progress import Sink, connect_ray, run_relaying_progress
from adapterswap.config import AdapterSwapConfig
from adapterswap.storage.fs import Location, delete_dir
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.privacy import private_process
from adapterswap.train.launcher import ShardOutcome, pool_size
from adapterswap.train.loop import StepInfo
from adapterswap.train.pool_worker import PoolWorker
from adapterswap.train.shard import ShardRun
from adapterswap.train.shard_queue import ShardQueue

NOT_REACHED = "the training pool stopped before it trained this shard"


@ray.remote(num_cpus=0, max_restarts=0)
class ShardQueueActor:
    """The pool's :class:`ShardQueue`, and the runs it hands out (the workers' only source of
    shard data: each worker receives one shard's rows at a time)."""

    def __init__(self, runs: list[dict[str, Any]], max_interruptions: int) -> None:
        self.runs = {run["adapter_id"]: run for run in runs}
        self.queue = ShardQueue(list(self.runs), max_interruptions)

    def take(self, rank: int) -> dict[str, Any] | None:
        key = self.queue.take(rank)
        return None if key is None else self.runs[key]

    def finish(self, rank: int, key: str, error: str | None) -> None:
        self.queue.finish(rank, key, error)

    def abandon(self, error: str) -> None:
        self.queue.abandon(error)

    def outcomes(self) -> dict[str, str | None]:
        return self.queue.outcomes()


def pool_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker: load the base model once, then train shards until none is left."""
    private_process()  # its checkpoints hold what the shards' text taught
    rank = ray.train.get_context().get_world_rank()
    worker = PoolWorker(cfg["model"], cfg["cache_dir"], ray.train.torch.get_device())
    queue, progress = cfg["queue"], cfg.get("progress")
    while (taken := ray.get(queue.take.remote(rank))) is not None:
        run = ShardRun(**taken)

        def on_step(info: StepInfo, shard: str = run.adapter_id) -> None:
            if progress is not None:
                progress.put_nowait({"shard": shard, **asdict(info)})
            if cfg.get("crash_once_at") == [shard, info.step]:
                _crash_once(cfg["fault_marker"])

        try:
            worker.train(run, on_step)
            error = None
        except Exception as exc:  # noqa: BLE001 - the shard fails alone; the worker goes on
            error = f"{type(exc).__name__}: {exc}"
        ray.get(queue.finish.remote(rank, run.adapter_id, error))


def _crash_once(marker: str) -> None:
    """Kill this worker's process the first time only (the marker survives the restart): a
    real worker death, which no ``except`` in the loop can catch."""
    path = Path(marker)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os._exit(1)


def _pool_trainer(
    config: AdapterSwapConfig, workers: int, loop_config: dict[str, Any]
) -> tuple[TorchTrainer, Location]:
    # Ray Train's own run directory (no checkpoints in it: each shard keeps its own) sits
    # beside the shards' checkpoint directories, named for this pool; deleted at the end.
    root = StorageLayout.from_config(config).checkpoints_root()
    name = f"pool-{uuid.uuid4().hex[:12]}"
    use_gpu = config.ray.train_use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    scaling = ScalingConfig(
        num_workers=workers,
        use_gpu=use_gpu,
        resources_per_worker={
            "CPU": config.ray.train_num_cpus_per_worker,
            **config.ray.train_resources_per_worker,
        },
    )
    trainer = TorchTrainer(
        pool_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=root.path,
            storage_filesystem=root.fs,
            failure_config=FailureConfig(max_failures=config.training.max_failures * workers),
        ),
    )
    return trainer, root.child(name)


def train_shards_in_pool(
    runs: list[ShardRun],
    config: AdapterSwapConfig,
    *,
    on_progress: Sink | None = None,
    crash_once_at: tuple[str, int] | None = None,
) -> list[ShardOutcome]:
    """Train every run in one pool of Ray Train workers; one outcome per run, in order.

    ``crash_once_at=(shard, step)`` kills the worker training ``shard`` once, at that step
    (a fault-injection hook for tests of the group's restart and the shard's resume).
    """
    if not runs:
        return []
    connect_ray(config)
    workers = pool_size(config, len(runs), ray.cluster_resources())
    queue = ShardQueueActor.remote([asdict(run) for run in runs], config.training.max_failures)
    loop_config: dict[str, Any] = {
        "queue": queue,
        "model": runs[0].model,
        "cache_dir": runs[0].cache_dir,
    }
    if crash_once_at is not None:
        marker = config.home_path / "faults" / f"pool-{crash_once_at[0]}-{crash_once_at[1]}"
        loop_config |= {"crash_once_at": list(crash_once_at), "fault_marker": str(marker)}

    def fit(progress: Queue | None) -> None:
        trainer, run_dir = _pool_trainer(config, workers, {**loop_config, "progress": progress})
        try:
            trainer.fit()
        except Exception as exc:  # noqa: BLE001 - what is left fails with the pool's error
            ray.get(queue.abandon.remote(f"training pool failed: {type(exc).__name__}: {exc}"))
        finally:
            delete_dir(run_dir)

    try:
        run_relaying_progress([fit], on_progress)
        errors = ray.get(queue.outcomes.remote())
    finally:
        ray.kill(queue)
    return [ShardOutcome(run, errors.get(run.adapter_id, NOT_REACHED)) for run in runs]
