"""The router: which adapters a request composes, and with which weights. No Ray here.

The caller passes only candidates the principal may see (the active adapters of its
groups); the router never sees another group's statistics, so nothing of them can leak
into the choice (invariant 1). For a query embedding q and candidate shards s:

1. **Score.** ``score_s(q)`` is the kernel density of q among the shard's own chunk
   embeddings, on cosine's scale: a soft maximum of q's cosine to them
   (``router_stats.score_shards``).
2. **Nothing relevant, no adapters.** If no shard scores ``min_score`` or more, the request
   runs on the base model alone. Otherwise a **sharp posterior**,
   ``p_s ∝ exp(score_s(q) / temperature)``.
3. **Top-k, cut, renormalise.** Keep the k most probable shards, renormalise, drop those
   under ``min_weight`` and renormalise again.
4. **Coverage gate.** The weights are scaled by the coverage ``c``, which rises linearly
   from 0 at ``min_score`` to 1 at ``full_score`` (the best shard's score); the remaining
   ``1 - c`` is the base model's (the composed delta is ``c · Σ w_s ΔW_s``).

Why the gate (invariant 6, do no harm): an adapter trained hard on its shard's documents
knows them and overrides what the base model knew about anything near them. A question on
the shard's topic that its documents do not answer scores like a paraphrase of a covered
one on topic alone, but lower than one naming what a document names: measured by
benchmarks/eval_harm.py on the manual pages and the installed packages' metadata, covered
questions scored 0.43-0.72 and never-ingested ones of the same groups 0.12-0.53. The
gate is a function of the best visible shard's score only, so it reads nothing another
group or another shard holds, and a deleted document stops opening it once its shard's
statistics are refit without it.

Why not the paper's uniform top-k average: averaging dilutes the one adapter that knows
the answer. Measured here on SmolLM2-135M, a memorised fact's NLL went from 0.001 with
its adapter alone to 1.19 under a uniform 1/3 mix, and stayed at 0.001 under 0.8/0.1/0.1.
A low temperature gives the sharp weights, and the cut removes weak candidates outright.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adapterswap.config import RouterSettings
from adapterswap.route.stats import ShardStats, score_shards
from adapterswap.types import AdapterRef, AdapterVersion


@dataclass(frozen=True)
class Candidate:
    """An adapter the caller may use, with its shard's routing statistics."""

    version: AdapterVersion
    stats: ShardStats


@dataclass(frozen=True)
class RoutedAdapter:
    """One adapter chosen for a request."""

    ref: AdapterRef
    group: str
    weight: float
    probability: float  # posterior before the top-k cut
    similarity: float  # the shard's score: soft maximum of the query's cosine to its chunks


@dataclass(frozen=True)
class RoutingDecision:
    """The adapters a request composes (empty: base model only) and why."""

    adapters: tuple[RoutedAdapter, ...]
    reason: str
    candidates: int
    best_similarity: float | None
    coverage: float = 0.0  # the adapters' share of the composition; the base model has the rest

    def as_dict(self) -> dict[str, object]:
        """The ``adapterswap.route.router`` block of a response: names only the chosen adapters."""
        return {
            "reason": self.reason,
            "candidates": self.candidates,
            "best_similarity": self.best_similarity,
            "coverage": self.coverage,
        }


def route(
    query: np.ndarray,
    candidates: Sequence[Candidate],
    settings: RouterSettings,
    *,
    top_k: int | None = None,
) -> RoutingDecision:
    """Pick and weight adapters for one query embedding (d,) among ``candidates``."""
    if not candidates:
        return decide([], np.zeros(0), settings, top_k=top_k)
    scores = score_shards(query, [c.stats for c in candidates])  # (S,)
    return decide([c.version for c in candidates], scores, settings, top_k=top_k)


def decide(
    versions: Sequence[AdapterVersion],
    scores: np.ndarray,
    settings: RouterSettings,
    *,
    top_k: int | None = None,
) -> RoutingDecision:
    """Steps 2-4 of the module on the candidates' scores ``(S,)`` (``versions[i]`` scored
    ``scores[i]``), however they were computed (``score_shards``, the routing index)."""
    k = settings.top_k if top_k is None else top_k
    if k == 0 or not versions:
        return RoutingDecision(
            (), "top_k is 0" if k == 0 else "no adapters visible", len(versions), None
        )
    best = float(scores.max())
    coverage = _coverage(best, settings)
    if coverage == 0.0:
        return RoutingDecision((), "nothing relevant", len(versions), best, 0.0)
    logits = scores / settings.temperature
    posterior = np.exp(logits - logits.max())
    posterior /= posterior.sum()
    order = sorted(range(len(versions)), key=lambda i: (-posterior[i], versions[i].adapter_id))
    chosen = _cut([(i, float(posterior[i])) for i in order[:k]], settings.min_weight)
    adapters = tuple(
        RoutedAdapter(
            ref=versions[i].ref,
            group=versions[i].group,
            weight=weight * coverage,
            probability=float(posterior[i]),
            similarity=float(scores[i]),
        )
        for i, weight in chosen
    )
    return RoutingDecision(adapters, "routed", len(versions), best, coverage)


def _coverage(best: float, settings: RouterSettings) -> float:
    """The adapters' share of the composition: 0 at ``min_score``, 1 from ``full_score``."""
    if best >= settings.full_score:
        return 1.0
    if best <= settings.min_score:
        return 0.0
    return (best - settings.min_score) / (settings.full_score - settings.min_score)


def _cut(ranked: list[tuple[int, float]], min_weight: float) -> list[tuple[int, float]]:
    """Renormalise the top-k, drop weights under ``min_weight``, renormalise again."""
    total = sum(p for _, p in ranked)
    kept = [(i, p / total) for i, p in ranked if p / total >= min_weight] or ranked[:1]
    total = sum(p for _, p in kept)
    return [(i, p / total) for i, p in kept]


def routing_texts(messages: Sequence[Mapping[str, str]]) -> list[str]:
    """What a chat request is routed on, in order of preference: the last user turn, then
    the whole conversation (when the last turn alone matches nothing, e.g. "and the date?")."""
    user_turns = [m.get("content", "") for m in messages if m.get("role") == "user"]
    texts = [user_turns[-1]] if user_turns else []
    whole = "\n".join(m.get("content", "") for m in messages if m.get("role") != "system")
    if whole and whole not in texts:
        texts.append(whole)
    return texts
