"""What a training job needs from whatever trains its shards. No Ray here.

The job (:func:`adapterswap.train.job.run_training`, and the deletion job through it)
registers each shard's version, hands the runs to a :class:`ShardLauncher` and publishes
what it reports. The launcher comes from the edge: ``actors.train_launcher`` runs one Ray
Train trainer per shard; tests pass one that trains in their own process or fails on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

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
