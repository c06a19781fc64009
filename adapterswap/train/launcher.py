"""What a training job needs from whatever trains its shards. No Ray here.

The job (:func:`adapterswap.train.job.run_training`, and the deletion job through it)
registers each shard's version, hands the runs to a :class:`ShardLauncher` and publishes
what it reports. The launcher comes from the edge: ``actors.train_launcher`` trains the
small shards in one pool of long-lived Ray Train workers (``actors.train_pool``) and gives
each larger shard a trainer of its own; tests pass one that trains in their own process or
fails on purpose. Which shards go where, and how many workers the pool has, is decided here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from adapterswap.catalog.documents import estimate_tokens
from adapterswap.config import AdapterSwapConfig
from adapterswap.train.shard import ShardRun


@dataclass(frozen=True)
class ShardOutcome:
    """How one shard's run ended: ``error`` is None when its artifacts were written."""

    run: ShardRun
    error: str | None


class ShardLauncher(Protocol):
    """Train every run (each writes its version's artifacts); one outcome per run, in order.

    ``on_progress`` receives step events ``{"shard", "step", "max_steps", "loss", ...}``.
    """

    def __call__(
        self,
        runs: list[ShardRun],
        config: AdapterSwapConfig,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[ShardOutcome]: ...


def split_for_pool(
    runs: list[ShardRun], max_shard_tokens: int
) -> tuple[list[ShardRun], list[ShardRun]]:
    """``(pooled, own)``: the runs of at most ``max_shard_tokens`` estimated tokens train in
    the pool, the larger ones each get a trainer of their own (``ray.train_pool_max_shard_tokens``)."""
    pooled, own = [], []
    for run in runs:
        size = sum(estimate_tokens(text) for text in run.texts)
        (pooled if size <= max_shard_tokens else own).append(run)
    return pooled, own


def pool_size(config: AdapterSwapConfig, n_shards: int, cluster: Mapping[str, float]) -> int:
    """How many workers the pool gets: ``ray.train_pool_workers``, else as many as the
    cluster's CPUs fit at ``ray.train_num_cpus_per_worker`` (and its GPUs, one per worker,
    when training on them); never more than the shards to train, never fewer than one."""
    ray = config.ray
    if ray.train_pool_workers is not None:
        fit = ray.train_pool_workers
    else:
        cpus = ray.train_num_cpus_per_worker
        fit = math.floor(cluster.get("CPU", 0) / cpus + 1e-9) if cpus > 0 else n_shards
        if ray.train_use_gpu is True or (ray.train_use_gpu == "auto" and cluster.get("GPU", 0)):
            fit = min(fit, math.floor(cluster.get("GPU", 0)))
    return max(1, min(fit, n_shards))
