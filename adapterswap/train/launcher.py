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
    cluster's resources fit at a worker's needs (``ray.train_num_cpus_per_worker``, each of
    ``ray.train_resources_per_worker``, and a GPU when training on them); never more than
    the shards to train, never fewer than one."""
    ray = config.ray
    if ray.train_pool_workers is not None:
        return max(1, min(ray.train_pool_workers, n_shards))
    need = {"CPU": ray.train_num_cpus_per_worker, **ray.train_resources_per_worker}
    if ray.train_use_gpu is True or (ray.train_use_gpu == "auto" and cluster.get("GPU", 0)):
        need["GPU"] = 1
    fits = [
        math.floor(cluster.get(name, 0) / amount + 1e-9)
        for name, amount in need.items()
        if amount > 0
    ]
    return max(1, min(min(fits, default=n_shards), n_shards))
