"""(a) Routing accuracy: is a held-out query's source shard the router's top-1, within its top-3?

    python benchmarks/eval_routing.py [--corpus DIR] [--max-shard-docs 8]

The manual-page corpus (benchmarks/manpages.py) is planned into shards exactly as ingest
does (``plan_shards``: topical by default, and the arrival-order ``sequential`` strategy for
comparison with the paper's unsorted shards), each shard's router statistics are fitted from
its own documents (``compute_shard_stats``, as training does), and every held-out passage,
never ingested, is routed by ``route`` with the default settings. The caller holds every
group, so all shards compete: the hardest case. No adapters are needed, so none are trained.

Writes results/routing.json and results/routing.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, write_result
from _plots import bar_chart
from manpages import Corpus, ensure_corpus

from adapterswap.catalog.documents import Document, content_hash
from adapterswap.catalog.planner import ShardPlan, assignments, plan_shards
from adapterswap.config import EmbeddingSettings, RouterSettings, ShardingSettings
from adapterswap.models.embedder import Embedder, load_embedder
from adapterswap.route.router import Candidate, route
from adapterswap.route.stats import compute_shard_stats
from adapterswap.types import AdapterStatus, AdapterVersion

PAPER = {"top1": (0.69, 0.81), "top3": (0.93, 0.95)}
GOAL = {"top1": 0.90, "top3": 0.98}


def as_documents(records: Sequence[dict[str, str]]) -> list[Document]:
    return [
        Document(r["id"], r["text"], r["group"], None, "{}", content_hash(r["text"]), r["id"])
        for r in records
    ]


def plan(corpus: Corpus, settings: ShardingSettings, embedder: Embedder) -> list[ShardPlan]:
    docs = as_documents(corpus.documents)
    return plan_shards(
        docs, batch="b0001", existing_shards=[], settings=settings, embed=embedder.embed
    )


def candidates_for(
    plans: Sequence[ShardPlan], corpus: Corpus, embedder: Embedder
) -> list[Candidate]:
    """One active adapter per shard, with its statistics fitted from its own documents."""
    text = {d["id"]: d["text"] for d in corpus.documents}
    out = []
    for p in plans:
        version = AdapterVersion(p.shard, 1, p.shard, p.group, AdapterStatus.ACTIVE, "", 0, "", "")
        stats = compute_shard_stats([text[i] for i in p.doc_ids], embedder.embed, embedder.model_id)
        out.append(Candidate(version, stats))
    return out


def accuracy(
    corpus: Corpus, plans: Sequence[ShardPlan], embedder: Embedder, router: RouterSettings
) -> dict[str, Any]:
    """Top-1 and top-3 accuracy of the router's posterior over all shards, per query."""
    candidates = candidates_for(plans, corpus, embedder)
    source = assignments(plans)
    queries = embedder.embed([q["text"] for q in corpus.queries])
    hits1 = hits3 = 0
    by_group: dict[str, list[int]] = {}
    for q, vector in zip(corpus.queries, queries, strict=True):
        ranked = route(
            vector,
            candidates,
            router.model_copy(update={"min_weight": 0.0, "min_score": -1.0, "full_score": -1.0}),
            top_k=3,
        )
        order = [a.ref.id for a in ranked.adapters]
        top1 = bool(order) and order[0] == source[q["doc_id"]]
        hits1 += top1
        hits3 += source[q["doc_id"]] in order
        by_group.setdefault(q["group"], []).append(int(top1))
    n = len(corpus.queries)
    return {
        "shards": len(plans),
        "queries": n,
        "top1": hits1 / n,
        "top3": hits3 / n,
        "top1_by_group": {g: float(np.mean(v)) for g, v in sorted(by_group.items())},
    }


def run(corpus_dir: Path, out: Path, max_shard_docs: int) -> dict[str, Any]:
    corpus = ensure_corpus(corpus_dir)
    embedder = load_embedder(EmbeddingSettings())
    router = RouterSettings()
    rows = {}
    for strategy in ("topical", "sequential"):
        settings = ShardingSettings(strategy=strategy, max_shard_docs=max_shard_docs)
        rows[strategy] = accuracy(corpus, plan(corpus, settings, embedder), embedder, router)
        print(strategy, rows[strategy], flush=True)
    payload = {
        "corpus": str(corpus_dir),
        "max_shard_docs": max_shard_docs,
        "router": router.model_dump(),
        "paper": PAPER,
        "goal": GOAL,
        "results": rows,
    }
    write_result("routing", payload, out)
    bar_chart(
        out / "routing.png",
        title=f"Routing accuracy, {rows['topical']['queries']} held-out queries, {rows['topical']['shards']} shards",
        groups={s: {"top-1": r["top1"], "top-3": r["top3"]} for s, r in rows.items()},
        ylabel="fraction of queries",
        hlines={"goal top-1": GOAL["top1"], "goal top-3": GOAL["top3"]},
    )
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=RESULTS / "corpus")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--max-shard-docs", type=int, default=8)
    args = parser.parse_args()
    run(args.corpus, args.out, args.max_shard_docs)


if __name__ == "__main__":
    main()
