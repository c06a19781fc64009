"""The shard planner: which shard each newly ingested document goes to.

Rules that hold for every plan:

- A shard holds documents of one group and one batch only, so access control and
  continual learning both work per shard.
- The planner only ever places *new* documents, into *new* shards. A placed document
  is never moved (its shard is stored in the catalog), so planning again, ingesting a
  later batch or deleting a document leaves every other placement as it was.
- Shards are bounded in estimated tokens and in documents.
- Plans are deterministic for a given seed and input order.

Two strategies, one function each:

- ``topical`` (default): within a group's batch, cluster documents by their SBERT
  embeddings (cosine k-means) and fill shards under the size bounds, most decided
  documents first. Topically coherent shards route better than random ones, because the
  router summarises each shard by the embeddings of its own documents.
- ``sequential``: fill shards in arrival order until a bound would be exceeded.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adapterswap.catalog.documents import Document
from adapterswap.config import ShardingSettings
from adapterswap.types import Embed

KMEANS_ITERATIONS = 25


@dataclass(frozen=True)
class ShardPlan:
    """One new shard and the documents placed in it, in arrival order."""

    shard: str
    group: str
    batch: str
    doc_ids: tuple[str, ...]
    tokens: int


def shard_id(group: str, batch: str, index: int) -> str:
    """Shard ids read ``<group>.<batch>.<index>``; group and batch names contain no dots."""
    return f"{group}.{batch}.{index:03d}"


def next_shard_index(existing_shards: Sequence[str], group: str, batch: str) -> int:
    """The first unused shard index of a group's batch."""
    prefix = f"{group}.{batch}."
    used = [int(s[len(prefix) :]) for s in existing_shards if s.startswith(prefix)]
    return max(used, default=-1) + 1


def plan_shards(
    docs: Sequence[Document],
    *,
    batch: str,
    existing_shards: Sequence[str],
    settings: ShardingSettings,
    embed: Embed | None = None,
) -> list[ShardPlan]:
    """Place new documents into new shards, one (group, batch) at a time.

    ``batch`` is the batch of documents that do not name their own; ``existing_shards``
    are the shard ids already in the catalog, so new ids never collide with them.
    ``embed`` is needed by the topical strategy only.
    """
    by_key: dict[tuple[str, str], list[Document]] = defaultdict(list)
    for doc in docs:
        by_key[(doc.group, doc.batch or batch)].append(doc)
    plans: list[ShardPlan] = []
    for (group, doc_batch), members in sorted(by_key.items()):
        if settings.strategy == "topical":
            if embed is None:
                raise ValueError("the topical strategy needs an embedder")
            clusters = cluster_topical(members, settings, embed, f"{group}/{doc_batch}")
        else:
            clusters = split_sequential(members, settings)
        start = next_shard_index(existing_shards, group, doc_batch)
        for offset, cluster in enumerate(clusters):
            plans.append(
                ShardPlan(
                    shard=shard_id(group, doc_batch, start + offset),
                    group=group,
                    batch=doc_batch,
                    doc_ids=tuple(members[i].id for i in cluster),
                    tokens=sum(members[i].tokens for i in cluster),
                )
            )
    return plans


def split_sequential(docs: Sequence[Document], settings: ShardingSettings) -> list[list[int]]:
    """Indices of ``docs`` split in arrival order under the token and document bounds."""
    shards: list[list[int]] = [[]]
    tokens = 0
    for index, doc in enumerate(docs):
        current = shards[-1]
        if current and (
            tokens + doc.tokens > settings.max_shard_tokens
            or len(current) >= settings.max_shard_docs
        ):
            shards.append([])
            tokens = 0
        shards[-1].append(index)
        tokens += doc.tokens
    return shards


def cluster_topical(
    docs: Sequence[Document], settings: ShardingSettings, embed: Embed, key: str
) -> list[list[int]]:
    """Indices of ``docs`` grouped into topical clusters under the size bounds.

    k is the fewest shards the bounds allow; k-means on unit-norm embeddings proposes
    the topics, then documents are assigned greedily, the most clear-cut first, to
    the nearest centroid that still has room. A document no centroid has room for opens
    a new shard. Clusters are ordered by their first document's arrival.
    """
    sizes = np.array([d.tokens for d in docs], dtype=np.int64)
    k = max(
        math.ceil(int(sizes.sum()) / settings.max_shard_tokens),
        math.ceil(len(docs) / settings.max_shard_docs),
    )
    if k <= 1:
        return [list(range(len(docs)))]
    vectors = np.asarray(embed([d.text for d in docs]), dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    rng = np.random.default_rng(_seed(settings.seed, key))
    centroids = _kmeans(vectors, k, rng)
    return _assign_with_capacity(vectors, sizes, centroids, settings)


def _seed(seed: int, key: str) -> int:
    # Each (group, batch) gets its own stream, so adding a group does not change another's plan.
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _kmeans(vectors: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Spherical k-means with k-means++ seeding. vectors:(n,d) unit rows -> centroids:(k,d)."""
    n = len(vectors)
    centroids = [vectors[rng.integers(n)]]
    for _ in range(1, k):
        dist = 1.0 - np.max(vectors @ np.array(centroids).T, axis=1)  # (n,)
        dist = dist.clip(min=0.0)
        total = dist.sum()
        probs = dist / total if total > 0 else np.full(n, 1.0 / n)
        centroids.append(vectors[rng.choice(n, p=probs)])
    cent = np.array(centroids)  # (k,d)
    for _ in range(KMEANS_ITERATIONS):
        labels = np.argmax(vectors @ cent.T, axis=1)  # (n,)
        new = np.array(
            [
                vectors[labels == j].mean(axis=0) if np.any(labels == j) else cent[j]
                for j in range(k)
            ]
        )
        new /= np.linalg.norm(new, axis=1, keepdims=True).clip(min=1e-12)
        if np.allclose(new, cent):
            break
        cent = new
    return cent


def _assign_with_capacity(
    vectors: np.ndarray, sizes: np.ndarray, centroids: np.ndarray, settings: ShardingSettings
) -> list[list[int]]:
    sims = vectors @ centroids.T  # (n,k)
    ranked = np.sort(sims, axis=1)
    regret = ranked[:, -1] - ranked[:, -2]  # how clearly each document belongs to its best topic
    order = sorted(range(len(vectors)), key=lambda i: (-regret[i], i))
    members: list[list[int]] = [[] for _ in range(len(centroids))]
    load = [0] * len(centroids)
    extra_centroids: list[np.ndarray] = []
    for i in order:
        all_cent = np.vstack([centroids, *extra_centroids]) if extra_centroids else centroids
        prefs = np.argsort(-(all_cent @ vectors[i]), kind="stable")
        target = next((int(j) for j in prefs if _fits(j, i, members, load, sizes, settings)), None)
        if target is None:
            extra_centroids.append(vectors[i])
            members.append([])
            load.append(0)
            target = len(members) - 1
        members[target].append(i)
        load[target] += int(sizes[i])
    clusters = [sorted(m) for m in members if m]
    return sorted(clusters, key=lambda c: c[0])


def _fits(
    j: int,
    i: int,
    members: list[list[int]],
    load: list[int],
    sizes: np.ndarray,
    s: ShardingSettings,
) -> bool:
    return load[j] + int(sizes[i]) <= s.max_shard_tokens and len(members[j]) < s.max_shard_docs


def assignments(plans: Sequence[ShardPlan]) -> Mapping[str, str]:
    """Document id -> shard id for a plan."""
    return {doc_id: plan.shard for plan in plans for doc_id in plan.doc_ids}
