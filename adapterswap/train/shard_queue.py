"""The queue a pool of training workers takes shards from, one at a time. No Ray here.

``actors.train_pool`` wraps it in an actor that the pool's Ray Train workers call. The queue
owns who trains what:

- Shards are handed out in the order given, each to one worker at a time: a shard in flight
  is never handed to another worker.
- A worker reports each shard ``done`` or ``failed`` (its error kept for the job's report) and
  asks for the next; a shard that failed is never handed out again.
- Workers are named by their rank in the worker group. When the group restarts after a
  worker died, every rank asks again while the queue still holds the shard its previous
  incarnation had in flight: that shard was interrupted, and the rank gets it back to resume
  from the shard's own checkpoint. A shard interrupted more than ``max_interruptions`` times
  fails instead (its error says so), so a shard that kills its worker is not retried forever.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence


class ShardQueue:
    """Shards (by key) for the ranks of one worker group; see the module docstring."""

    def __init__(self, keys: Sequence[str], max_interruptions: int) -> None:
        if len(set(keys)) != len(keys):
            raise ValueError("ShardQueue: every shard key must be distinct")
        self._pending = deque(keys)
        self._keys = tuple(keys)
        self._max_interruptions = max_interruptions
        self._in_flight: dict[int, str] = {}
        self._interruptions: Counter[str] = Counter()
        self._errors: dict[str, str | None] = {}

    def take(self, rank: int) -> str | None:
        """The shard rank ``rank`` trains next: the one it had in flight before its group
        restarted, else the next pending one; None when nothing is left for it."""
        interrupted = self._in_flight.pop(rank, None)
        if interrupted is not None:
            self._interruptions[interrupted] += 1
            times = self._interruptions[interrupted]
            if times <= self._max_interruptions:
                self._in_flight[rank] = interrupted
                return interrupted
            self._errors[interrupted] = (
                f"WorkerCrashed: the training worker stopped {times} times while training "
                "this shard (training.max_failures is "
                f"{self._max_interruptions})"
            )
        if not self._pending:
            return None
        key = self._pending.popleft()
        self._in_flight[rank] = key
        return key

    def finish(self, rank: int, key: str, error: str | None = None) -> None:
        """Rank ``rank`` finished ``key``: written (``error`` None) or failed with ``error``."""
        if self._in_flight.get(rank) != key:
            raise ValueError(f"ShardQueue: rank {rank} does not hold shard {key!r}")
        del self._in_flight[rank]
        self._errors[key] = error

    def abandon(self, error: str) -> None:
        """The worker group stopped for good: every shard not finished fails with ``error``."""
        for key in [*self._in_flight.values(), *self._pending]:
            self._errors[key] = error
        self._in_flight.clear()
        self._pending.clear()

    def in_flight(self) -> dict[int, str]:
        """Which rank holds which shard now."""
        return dict(self._in_flight)

    def outcomes(self) -> dict[str, str | None]:
        """Each finished shard's error (None: done), in the order the shards were given."""
        return {key: self._errors[key] for key in self._keys if key in self._errors}
