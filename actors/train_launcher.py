"""Ray Train launch: small shards in one pool of workers, each larger shard with a trainer of
its own. :func:`train_shards_with_ray` is the ``ShardLauncher`` the CLI, the job runner and
deletion retraining use.

- Shards of at most ``ray.train_pool_max_shard_tokens`` estimated tokens go to the pool
  (``actors.train_pool``): one trainer, started once, whose workers take shard after shard,
  so a shard costs its data loading and optimiser set-up, not ~18-20 s of trainer start-up.
- Each larger shard gets one ``TorchTrainer`` of its own (:func:`train_shards_one_trainer_each`),
  all concurrently, as before the pool: it can use several workers (DDP) via
  ``ray.train_workers_per_shard``, and its failure and recovery are its own (``FailureConfig``
  restarts its worker group, which resumes from *its* Ray Train checkpoint). Its workers form
  one DDP group for that shard only: shards never share gradients. Measured here: three
  single-worker trainers started from threads finished together in 22 s against 18 s for one.

The pool runs first, then the large shards, so the two never wait on each other's resources.
The per-shard worker loop stays thin: load the base model, build the library's
``ShardTrainer``, resume from Ray Train's checkpoint if any, step, report, and let rank 0
write the artifacts.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from actors.train_pool import train_shards_in_pool
from actors.train_progress import Sink, connect_ray, run_relaying_progress
from adapterswap.config import AdapterSwapConfig
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.privacy import private_process
from adapterswap.train.launcher import ShardOutcome, split_for_pool
from adapterswap.train.shard import ShardRun, finish_shard_run, start_shard_trainer, step_or_explain


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker: train one shard's adapter, checkpointing as it goes."""
    private_process()  # its checkpoints hold what the shard's text taught
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    run = ShardRun(**cfg["run"])
    wrap = ray.train.torch.prepare_model if world > 1 else None
    trainer, _ = start_shard_trainer(run, ray.train.torch.get_device(), rank, world, wrap)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(Path(directory))
    progress: Queue | None = cfg.get("progress")
    while not trainer.done:
        info = step_or_explain(trainer, run)
        if progress is not None and rank == 0:
            progress.put_nowait({"shard": run.adapter_id, **asdict(info)})
        if cfg.get("fail_once_at_step") == info.step and _first_failure(cfg["fault_marker"]):
            raise RuntimeError(f"injected failure in shard {run.adapter_id} at step {info.step}")
        if info.step % run.training["checkpoint_every"] == 0 or trainer.done:
            with tempfile.TemporaryDirectory() as directory:
                trainer.save_checkpoint(Path(directory))
                metrics = {"loss": info.loss, "step": info.step, "tokens_per_s": info.tokens_per_s}
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
    if rank == 0:
        finish_shard_run(run, trainer)


def _first_failure(marker: str) -> bool:
    """True only the first time (the marker file survives the worker restart)."""
    path = Path(marker)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return True


def _trainer_for(
    run: ShardRun, config: AdapterSwapConfig, loop_config: dict[str, Any]
) -> TorchTrainer:
    # Ray Train writes <storage_path>/<name>: the run directory the layout (and a purge) knows.
    checkpoints = StorageLayout.from_config(config).checkpoints(run.ref)
    use_gpu = config.ray.train_use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    scaling = ScalingConfig(
        num_workers=config.ray.train_workers_per_shard,
        use_gpu=use_gpu,
        resources_per_worker={
            "CPU": config.ray.train_num_cpus_per_worker,
            **config.ray.train_resources_per_worker,
        },
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": asdict(run), **loop_config},
        scaling_config=scaling,
        run_config=RunConfig(
            name=posixpath.basename(checkpoints.path),
            storage_path=posixpath.dirname(checkpoints.path),
            storage_filesystem=checkpoints.fs,
            failure_config=FailureConfig(max_failures=config.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )


def train_shards_with_ray(
    runs: list[ShardRun], config: AdapterSwapConfig, *, on_progress: Sink | None = None
) -> list[ShardOutcome]:
    """Train the small shards in the pool, then each larger one with a trainer of its own;
    one outcome per run, in order (the :class:`~adapterswap.train.launcher.ShardLauncher`
    the jobs are given on Ray)."""
    pooled, own = split_for_pool(runs, config.ray.train_pool_max_shard_tokens)
    outcomes = train_shards_in_pool(pooled, config, on_progress=on_progress)
    outcomes += train_shards_one_trainer_each(own, config, on_progress=on_progress)
    by_shard = {outcome.run.adapter_id: outcome for outcome in outcomes}
    return [by_shard[run.adapter_id] for run in runs]


def train_shards_one_trainer_each(
    runs: list[ShardRun],
    config: AdapterSwapConfig,
    *,
    on_progress: Sink | None = None,
    fail_once_at_step: int | None = None,
) -> list[ShardOutcome]:
    """Run one TorchTrainer per shard concurrently; returns each shard's outcome.

    ``fail_once_at_step`` makes every shard's worker crash once at that step (a
    fault-injection hook for tests of ``FailureConfig`` recovery).
    """
    if not runs:
        return []
    connect_ray(config)
    outcomes: dict[str, ShardOutcome] = {}

    def fit(run: ShardRun, progress: Queue | None) -> None:
        loop_config: dict[str, Any] = {"progress": progress}
        if fail_once_at_step is not None:
            marker = config.home_path / "faults" / f"{run.adapter_id}-v{run.version}"
            loop_config |= {"fail_once_at_step": fail_once_at_step, "fault_marker": str(marker)}
        try:
            _trainer_for(run, config, loop_config).fit()
            outcomes[run.adapter_id] = ShardOutcome(run, None)
        except Exception as exc:  # noqa: BLE001 - every failure becomes that shard's outcome
            outcomes[run.adapter_id] = ShardOutcome(run, f"{type(exc).__name__}: {exc}")

    run_relaying_progress([partial(fit, run) for run in runs], on_progress)
    return [outcomes[run.adapter_id] for run in runs]
