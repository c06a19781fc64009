"""A gateway replica's routing index: every active version's chunk embeddings, by group. No Ray.

``score_shards`` loops shard by shard, one small product each: fine for dozens of shards,
not for thousands. The index packs the chunk embeddings of each access group's active
versions into one contiguous float32 matrix, with each shard's row offsets, so a request
scores its caller's shards with one matrix-vector product per group and a segmented
log-mean-exp (``np.maximum.reduceat`` / ``np.add.reduceat``) over the rows: the same kernel
density as ``score_shards``, ``τ · log mean_i exp(cos(q, e_i) / τ)`` per shard.

Isolation (invariant 1): the caller's groups are applied before anything is computed. Only
the matrices of the caller's groups are read; another group's rows are never multiplied,
so a caller's scores cannot depend on them (and a shard's score never depends on another
shard's rows either: the segments are disjoint).

Updates are incremental and follow the active set. A version's statistics are read (from
storage, through the adapter source) the first time a request can route to it, outside the
index's lock; a version that leaves the active set has its rows dropped at once by
``retain`` (``ActiveSet``'s eviction hook), since they derive from its documents. Only the
groups a change touched are packed again, at their next request.

No vector-search library: the kernel density needs the cosine to every chunk of every
candidate shard, which an approximate top-k search does not give, and at these sizes an
exact search in such a library is the same product (benchmarks/route_scale.py measured it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from adapterswap.route.stats import KERNEL_BANDWIDTH, ShardStats
from adapterswap.types import AdapterRef, AdapterVersion

Key = tuple[str, int]  # (adapter id, version): cheaper to build per candidate than a ref


def _key(version: AdapterVersion) -> Key:
    return version.adapter_id, version.version


@dataclass(frozen=True)
class _Packed:
    """One group's shards, packed: rows of every shard in adapter-id order, and where each
    shard's rows start (``starts``) and how many it has (``counts``)."""

    matrix: np.ndarray  # (N, d) float32, C-contiguous
    starts: np.ndarray  # (S,) int64
    counts: np.ndarray  # (S,) int64
    keys: list[Key]  # (S,)
    position: dict[Key, int]


def _pack(shards: dict[Key, np.ndarray]) -> _Packed | None:
    """A group's shards' rows packed in adapter-id order; None when it has none."""
    if not shards:
        return None
    keys = sorted(shards)
    chunks = [shards[k] for k in keys]
    counts = np.array([c.shape[0] for c in chunks], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    matrix = np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)
    return _Packed(matrix, starts, counts, keys, {k: i for i, k in enumerate(keys)})


def segment_scores(z: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``τ · log mean exp(z)`` over each segment of ``z`` (cosines divided by τ), stable.

    # z:(N,) float64, segments [starts[s], starts[s] + counts[s]) → (S,)
    """
    top = np.maximum.reduceat(z, starts)
    sums = np.add.reduceat(np.exp(z - np.repeat(top, counts)), starts)
    return KERNEL_BANDWIDTH * (top + np.log(sums / counts))


class RoutingIndex:
    """The routing statistics of the active versions, packed per group (see the module)."""

    def __init__(self, stats: Callable[[AdapterRef], ShardStats]) -> None:
        """``stats(ref)`` reads one version's statistics (``StorageAdapterSource.router_stats``)."""
        self._read_stats = stats
        self._lock = threading.Lock()
        # Each shard's chunk rows (n, d) float32: once its group is packed, a view into the
        # group's matrix, so the index holds one copy of the statistics.
        self._groups: dict[str, dict[Key, np.ndarray]] = {}
        self._packed: dict[str, _Packed | None] = {}
        self._group_of: dict[Key, str] = {}
        self._retained: set[Key] | None = None  # the active set at the last retain

    def retain(self, keep: set[AdapterRef]) -> list[AdapterRef]:
        """Drop the rows of every version not in ``keep`` (the active set), at once; returns
        the versions dropped."""
        kept = {(r.id, r.version) for r in keep}
        with self._lock:
            self._retained = kept
            gone = [k for k in self._group_of if k not in kept]
            for key in gone:
                group = self._group_of.pop(key)
                del self._groups[group][key]
                self._packed.pop(group, None)  # the old matrix holds the rows: let it go now
        return [AdapterRef(*k) for k in gone]

    def add(self, versions: Iterable[AdapterVersion]) -> None:
        """Read and index the statistics of those ``versions`` not yet indexed.

        Read outside the lock (storage is slow); a version the active set dropped meanwhile
        is not added, so a revoked version's rows never come back.
        """
        with self._lock:
            missing = [v for v in versions if _key(v) not in self._group_of]
        read = [(v, self._read_stats(v.ref)) for v in missing]
        with self._lock:
            for version, stats in read:
                key = _key(version)
                if self._retained is not None and key not in self._retained:
                    continue
                self._groups.setdefault(version.group, {})[key] = stats.chunks
                self._group_of[key] = version.group
                self._packed.pop(version.group, None)

    def score(
        self, query: np.ndarray, candidates: Sequence[AdapterVersion]
    ) -> tuple[list[AdapterVersion], np.ndarray]:
        """The kernel-density score of one query ``(d,)`` under each of ``candidates`` that
        is indexed (all, unless one left the active set meanwhile): those versions, in the
        order given, and their scores. Reads only the rows of the candidates' groups."""
        q = np.asarray(query, dtype=np.float64)
        if q.ndim != 1:
            raise ValueError(f"query: expected shape (d,), got {q.shape}")
        q = (q / max(float(np.linalg.norm(q)), 1e-12)).astype(np.float32)
        by_group: dict[str, list[int]] = {}
        for i, version in enumerate(candidates):
            by_group.setdefault(version.group, []).append(i)
        scores = np.zeros(len(candidates), dtype=np.float64)
        found = np.zeros(len(candidates), dtype=bool)
        for group in sorted(by_group):
            packed = self._packed_group(group)
            if packed is None:
                continue
            if packed.matrix.shape[1] != q.shape[0]:
                raise ValueError(
                    f"query: dim {q.shape[0]} does not match shard stats dim "
                    f"{packed.matrix.shape[1]}"
                )
            z = (packed.matrix @ q).astype(np.float64) / KERNEL_BANDWIDTH
            mine = segment_scores(z, packed.starts, packed.counts)
            rows = by_group[group]
            keys = [_key(candidates[i]) for i in rows]
            if keys == packed.keys:  # the usual case: the caller sees the whole group
                scores[rows], found[rows] = mine, True
                continue
            for i, key in zip(rows, keys, strict=True):
                at = packed.position.get(key)
                if at is not None:
                    scores[i], found[i] = mine[at], True
        if found.all():
            return list(candidates), scores
        return [v for v, f in zip(candidates, found, strict=True) if f], scores[found]

    def _packed_group(self, group: str) -> _Packed | None:
        """The group's packed rows, packed again if a change touched it since."""
        with self._lock:
            if group not in self._packed:
                shards = self._groups.get(group, {})
                packed = self._packed[group] = _pack(shards)
                if packed is not None:  # the rows as read (or the old matrix) are let go
                    for key, start, count in zip(
                        packed.keys, packed.starts, packed.counts, strict=True
                    ):
                        shards[key] = packed.matrix[start : start + count]
            return self._packed[group]
