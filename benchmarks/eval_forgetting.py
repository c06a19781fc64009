"""(d) Forgetting: the first batch's perplexity after each of several sequential batches.

    python benchmarks/eval_forgetting.py [--corpus DIR] [--group library] [--batches 6]
                                         [--docs-per-batch 2] [--epochs 12]

Documents of one group arrive in ``--batches`` batches. Three ways to keep a model current,
each with the same budget per document (``--epochs`` passes over the data it trains on):

- **AdapterSwap**: each batch becomes a new adapter; old adapters are never touched. Measured
  through our router over every adapter so far (what a caller gets), and with the first
  batch's own adapter alone (flat by construction: its weights never change, checked here by
  hashing them after every batch).
- **chronological**: one adapter fine-tuned on each batch in turn (``train_chronological``).
- **retrain on everything so far**: after each batch, a fresh adapter on all batches seen.

The measure is the first batch's second-half perplexity given the first half (as in
eval_knowledge.py), after each batch. Training tokens are the cost of each approach.

Writes results/forgetting.{json,png}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _common import write_result
from _knowledge import (
    Adapter,
    System,
    adapter_of,
    load_model,
    perplexity,
    run_from_command_line,
    train_adapter,
)
from _plots import line_chart
from manpages import ensure_corpus

from adapterswap.config import EmbeddingSettings, LoraSettings, TrainingSettings
from adapterswap.models.embedder import load_embedder
from adapterswap.train.chronological import train_chronological
from adapterswap.train.loop import ShardTrainer
from adapterswap.types import AdapterRef

SERIES = (
    "AdapterSwap (routed)",
    "AdapterSwap (batch-1 adapter)",
    "chronological",
    "retrain on all so far",
)


def run(
    corpus_dir: Path,
    out: Path,
    *,
    spec: str,
    cache: Path,
    group: str,
    batches: int,
    docs_per_batch: int,
    epochs: float,
) -> dict[str, Any]:
    corpus = ensure_corpus(corpus_dir)
    docs = [d["text"] for d in corpus.documents if d["group"] == group]
    if len(docs) < batches * docs_per_batch:
        raise SystemExit(
            f"--group {group}: {len(docs)} documents, need --batches × --docs-per-batch = "
            f"{batches * docs_per_batch}"
        )
    batch_texts = [docs[i * docs_per_batch : (i + 1) * docs_per_batch] for i in range(batches)]
    first = batch_texts[0]
    training = TrainingSettings(epochs=epochs)
    system = System(spec, load_embedder(EmbeddingSettings()), batches + 2, cache_dir=cache)
    curves: dict[str, list[float]] = {name: [] for name in SERIES}
    tokens: dict[str, list[int]] = {
        "AdapterSwap": [],
        "chronological": [],
        "retrain on all so far": [],
    }

    def first_batch(ref: AdapterRef) -> float:
        return perplexity([system.nll(t, [(ref, 1.0)]) for t in first])

    base = perplexity([system.nll(t, []) for t in first])
    swap: list[Adapter] = []
    for t, texts in enumerate(batch_texts):  # AdapterSwap: one new adapter per batch
        ref = AdapterRef(f"{group}.b{t + 1:04d}.000", 1)
        swap.append(train_adapter(spec, ref, group, texts, training, seed=t, cache_dir=cache))
        system.add(swap[-1], texts)
        tokens["AdapterSwap"].append(sum(a.tokens for a in swap))
        curves["AdapterSwap (routed)"].append(perplexity([system.routed_nll(x) for x in first]))
        curves["AdapterSwap (batch-1 adapter)"].append(first_batch(swap[0].ref))
        print(f"batch {t + 1}: AdapterSwap {_last(curves)}", flush=True)

    def after_batch(t: int, trainer: ShardTrainer) -> None:
        adapter = adapter_of(trainer, AdapterRef("chronological", t + 1), group, 0.0)
        system.load(adapter)
        tokens["chronological"].append(trainer.tokens_seen)
        curves["chronological"].append(first_batch(adapter.ref))

    loaded = load_model(spec, cache)
    train_chronological(
        loaded.model,
        loaded.tokenizer,
        batch_texts,
        LoraSettings(),
        training,
        seed=0,
        after_batch=after_batch,
    )
    print(f"chronological: {curves['chronological']}", flush=True)

    spent = 0
    for t in range(batches):  # retrain one adapter on everything so far, after every batch
        seen = [x for texts in batch_texts[: t + 1] for x in texts]
        adapter = train_adapter(
            spec, AdapterRef("retrained", t + 1), group, seen, training, seed=0, cache_dir=cache
        )
        system.load(adapter)
        spent += adapter.tokens
        tokens["retrain on all so far"].append(spent)
        curves["retrain on all so far"].append(first_batch(adapter.ref))
    print(f"retrain on all so far: {curves['retrain on all so far']}", flush=True)

    drift = {name: ys[-1] / ys[0] - 1.0 for name, ys in curves.items()}
    payload = {
        "corpus": str(corpus_dir),
        "model": spec,
        "group": group,
        "batches": batches,
        "docs_per_batch": docs_per_batch,
        "epochs": epochs,
        "base_model_perplexity": base,
        "first_batch_perplexity": curves,
        "drift_after_last_batch": drift,
        "training_tokens": tokens,
        "adapterswap_flat": len(set(curves["AdapterSwap (batch-1 adapter)"])) == 1,
    }
    write_result("forgetting", payload, out)
    line_chart(
        out / "forgetting.png",
        title=f"First-batch perplexity after each batch ({group}, {docs_per_batch} pages per batch)",
        x=list(range(1, batches + 1)),
        series=curves,
        xlabel="batches trained",
        ylabel="first-batch perplexity (second half | first half)",
    )
    return payload


def _last(curves: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(ys[-1], 3) for name, ys in curves.items() if ys}


def main() -> None:
    run_from_command_line(
        run,
        __doc__,
        group=(str, "library"),
        batches=(int, 6),
        docs_per_batch=(int, 2),
        epochs=(float, 12),
    )


if __name__ == "__main__":
    main()
