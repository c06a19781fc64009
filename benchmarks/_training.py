"""What the training benchmarks share: a throw-away home's configuration, and a timed run of
every pending shard through Ray Train (the path ``adapterswap train`` takes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from actors.train_launcher import train_shards_with_ray
from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import TrainReport, run_training


def benchmark_config(
    home: str, model: str, steps: int, cpus_per_worker: float, *overrides: str
) -> AdapterSwapConfig:
    """A configuration for ``home``: ``model`` (converted once into the user's model cache),
    ``steps`` steps per shard, sequential shards, ``cpus_per_worker`` per Ray Train worker."""
    return load_config(
        home=home,
        environ={},
        overrides=[
            f"model.spec={model}",
            "model.cache_dir=~/.adapterswap/models",
            f"training.max_steps={steps}",
            "sharding.strategy=sequential",
            f"ray.train_num_cpus_per_worker={cpus_per_worker}",
            *overrides,
        ],
    )


def train_with_ray(
    config: AdapterSwapConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> tuple[TrainReport, float]:
    """Train every pending shard through Ray Train: the report (no shard failed) and the wall
    time in seconds."""
    started = time.perf_counter()
    report = run_training(
        config,
        AdapterRegistry(config.db_path),
        train_shards=train_shards_with_ray,
        on_progress=on_progress,
    )
    wall = time.perf_counter() - started
    assert not report.failed, report.failed
    return report, wall
