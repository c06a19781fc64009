"""(b) Mixture quality and (c) removal, on one set of shards trained from the manual pages.

    python benchmarks/eval_knowledge.py [--corpus DIR] [--per-group 8] [--docs-per-shard 4]
                                        [--steps 20] [--delete 2]

The first ``--per-group`` documents of each group are planned into shards as ingest does
(topical, at most ``--docs-per-shard`` documents each) and one adapter is trained per shard
(``ShardTrainer``, the default LoRA, ``--steps`` steps, each shard's own seed). A caller who
holds every group then reads each document's first half; the measure is the perplexity of
its second half given the first (nats per token, exp of the mean over documents).

(b) Mixture quality, four ways of composing for the same prompt: the correct adapter alone
(the shard that holds the document), our routed mixture (``route`` on the prompt, default
settings), the paper's uniform average of the router's top-3, and no adapter (base model).

(c) Removal: ``--delete`` documents of the first shard are deleted; the shard is retrained
without them (version 2, same seed and steps) and its router statistics refit, as the delete
job does. Their perplexity before and after, through the routed system, is compared with
never-ingested control pages of the same group scored the same way (``verify_forget``'s rule:
a deleted document passes when at least one control is more predictable). The cost of
retraining that one shard is set against retraining every shard (the initial training).

Writes results/mixture.{json,png} and results/removal.{json,png}.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import write_result
from _knowledge import (
    Adapter,
    System,
    halves,
    perplexity,
    run_from_command_line,
    train_adapter,
)
from _plots import bar_chart
from eval_routing import as_documents
from manpages import Corpus, ensure_corpus

from adapterswap.catalog.planner import ShardPlan, plan_shards
from adapterswap.config import EmbeddingSettings, ShardingSettings, TrainingSettings
from adapterswap.delete.verify_forget import verify_forget
from adapterswap.models.embedder import Embedder, load_embedder
from adapterswap.train.loop import shard_seed
from adapterswap.types import AdapterRef

CONDITIONS = ("correct adapter", "routed (ours)", "uniform top-3", "base model")
GOAL_RATIO = 1.2


def plan(
    corpus: Corpus, per_group: int, docs_per_shard: int, embedder: Embedder
) -> list[ShardPlan]:
    picked = [
        d
        for g in corpus.groups()
        for d in [r for r in corpus.documents if r["group"] == g][:per_group]
    ]
    settings = ShardingSettings(max_shard_docs=docs_per_shard)
    return plan_shards(
        as_documents(picked),
        batch="b0001",
        existing_shards=[],
        settings=settings,
        embed=embedder.embed,
    )


def train_all(
    spec: str,
    cache: Path,
    plans: Sequence[ShardPlan],
    text: dict[str, str],
    training: TrainingSettings,
) -> list[Adapter]:
    adapters = []
    for p in plans:
        ref = AdapterRef(p.shard, 1)
        adapters.append(
            train_adapter(
                spec,
                ref,
                p.group,
                [text[i] for i in p.doc_ids],
                training,
                seed=shard_seed(training.seed, p.shard),
                cache_dir=cache,
            )
        )
        print(
            f"trained {p.shard}: {len(p.doc_ids)} documents, {adapters[-1].seconds:.0f} s",
            flush=True,
        )
    return adapters


def mixture_quality(
    system: System, plans: Sequence[ShardPlan], text: dict[str, str]
) -> dict[str, Any]:
    nlls: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    for p in plans:
        for doc_id in p.doc_ids:
            prompt = halves(text[doc_id])[0]
            mixtures = {
                "correct adapter": [(AdapterRef(p.shard, 1), 1.0)],
                "routed (ours)": system.routed(prompt),
                "uniform top-3": system.uniform_top3(prompt),
                "base model": [],
            }
            for condition, rows in mixtures.items():
                nlls[condition].append(system.nll(text[doc_id], rows))
    ppl = {c: perplexity(v) for c, v in nlls.items()}
    ratio = ppl["routed (ours)"] / ppl["correct adapter"]
    return {
        "documents": len(nlls["base model"]),
        "perplexity": ppl,
        "mean_nll": {c: statistics.mean(v) for c, v in nlls.items()},
        "routed_over_correct": ratio,
        "uniform_over_correct": ppl["uniform top-3"] / ppl["correct adapter"],
        "goal_met": ratio <= GOAL_RATIO,
    }


def removal(
    system: System,
    adapters: list[Adapter],
    plans: Sequence[ShardPlan],
    text: dict[str, str],
    corpus: Corpus,
    training: TrainingSettings,
    delete: int,
    *,
    spec: str,
    cache: Path,
) -> dict[str, Any]:
    """Delete documents of the first shard, retrain it, and score them against controls."""
    shard = plans[0]
    deleted, kept = shard.doc_ids[:delete], shard.doc_ids[delete:]
    if not kept:
        raise SystemExit(f"--delete {delete}: leaves shard {shard.shard} empty; delete fewer")
    controls = [c["text"] for c in corpus.controls if c["group"] == shard.group]
    scorer = lambda texts, group: [system.routed_nll(t) for t in texts]  # noqa: E731
    before = {i: verify_forget(i, shard.group, text[i], controls, scorer) for i in deleted}
    kept_before = statistics.mean(system.routed_nll(text[i]) for i in kept)

    started = time.perf_counter()
    retrained = train_adapter(
        spec,
        AdapterRef(shard.shard, 2),
        shard.group,
        [text[i] for i in kept],
        training,
        seed=shard_seed(training.seed, shard.shard),
        cache_dir=cache,
    )
    retrain_s = time.perf_counter() - started
    system.add(retrained, [text[i] for i in kept])  # version 1 is evicted, as on a replica

    rows = {}
    for doc_id in deleted:
        after = verify_forget(doc_id, shard.group, text[doc_id], controls, scorer)
        rows[doc_id] = {
            "before_nll": before[doc_id].deleted_nll,
            "after_nll": after.deleted_nll,
            "base_nll": system.nll(text[doc_id], []),
            "control_nlls": after.control_nlls,
            "percentile_before": before[doc_id].percentile,
            "percentile_after": after.percentile,
            "passed_before": before[doc_id].passed,
            "passed_after": after.passed,
        }
        print(before[doc_id].summary(), "->", after.summary(), flush=True)
    all_s = sum(a.seconds for a in adapters)
    all_tokens = sum(a.tokens for a in adapters)
    return {
        "shard": shard.shard,
        "deleted": rows,
        "kept_mean_nll": {
            "before": kept_before,
            "after": statistics.mean(system.routed_nll(text[i]) for i in kept),
        },
        "all_passed_after": all(r["passed_after"] for r in rows.values()),
        "cost": {
            "one_shard": {"seconds": retrain_s, "tokens": retrained.tokens},
            "all_shards": {"seconds": all_s, "tokens": all_tokens, "shards": len(adapters)},
            "tokens_ratio": all_tokens / retrained.tokens,
            "seconds_ratio": all_s / retrain_s,
        },
    }


def run(
    corpus_dir: Path,
    out: Path,
    *,
    spec: str,
    cache: Path,
    per_group: int,
    docs_per_shard: int,
    steps: int,
    delete: int,
) -> dict[str, Any]:
    corpus = ensure_corpus(corpus_dir)
    embedder = load_embedder(EmbeddingSettings())
    training = TrainingSettings(max_steps=steps)
    plans = plan(corpus, per_group, docs_per_shard, embedder)
    text = {d["id"]: d["text"] for d in corpus.documents}
    adapters = train_all(spec, cache, plans, text, training)
    system = System(spec, embedder, len(adapters), cache_dir=cache)
    for adapter, p in zip(adapters, plans, strict=True):
        system.add(adapter, [text[i] for i in p.doc_ids])
    setup = {
        "corpus": str(corpus_dir),
        "model": spec,
        "steps": steps,
        "shards": len(plans),
        "docs_per_shard": docs_per_shard,
    }

    quality = mixture_quality(system, plans, text)
    print({k: v for k, v in quality.items() if k != "mean_nll"}, flush=True)
    write_result("mixture", setup | quality, out)
    bar_chart(
        out / "mixture.png",
        title=f"Second-half perplexity given the first half, {quality['documents']} documents, {len(plans)} shards",
        groups={c: {"perplexity": quality["perplexity"][c]} for c in CONDITIONS},
        ylabel="perplexity (log scale)",
        log=True,
    )

    removed = removal(
        system, adapters, plans, text, corpus, training, delete, spec=spec, cache=cache
    )
    write_result("removal", setup | removed, out)
    bar_chart(
        out / "removal.png",
        title=f"Deleted documents of {removed['shard']}: NLL before and after, against controls",
        groups={
            doc: {
                "before delete": r["before_nll"],
                "after delete": r["after_nll"],
                "base model": r["base_nll"],
            }
            for doc, r in removed["deleted"].items()
        }
        | {
            "kept docs (mean)": {
                "before delete": removed["kept_mean_nll"]["before"],
                "after delete": removed["kept_mean_nll"]["after"],
            }
        },
        ylabel="second-half NLL (nats/token)",
        hlines={
            "lowest control": min(
                c for r in removed["deleted"].values() for c in r["control_nlls"]
            ),
            "median control": statistics.median(
                c for r in removed["deleted"].values() for c in r["control_nlls"]
            ),
        },
    )
    return {"mixture": quality, "removal": removed}


def main() -> None:
    run_from_command_line(
        run, __doc__, per_group=(int, 8), docs_per_shard=(int, 4), steps=(int, 20), delete=(int, 2)
    )


if __name__ == "__main__":
    main()
