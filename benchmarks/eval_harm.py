"""(f) Help and harm, side by side: what adapters add where their documents speak, and what
they cost where their documents say nothing (invariant 6, do no harm).

    python benchmarks/eval_harm.py [--out DIR] [--steps 40] [--docs-per-shard 8]

Two corpora of real text nobody on the project wrote: two sections of the manual pages
(manpages.py, in ``--corpus``) and the metadata of the installed Python packages (packages.py). In each, one
shard of ``--docs-per-shard`` documents per group is trained (``ShardTrainer``, the default
LoRA and training, each shard's own seed) and served as a replica does (``route``, then the
``AdapterBank``) to a caller who holds every group. Measured per token, against the base
model:

- **covered**: each fact of an ingested document, as the continuation of the document's own
  words and as a question phrased unlike it (answer NLL and greedy exact match), and the
  document's second half given its first;
- **uncovered, same topic**: the same for never-ingested documents of the same groups;
- **general**: Python standard-library docstrings, second half given first (perplexity).

Methods, each alone and together:

- routing: today's router (``min_score`` 0.2, no gate); the coverage gate (the default
  ``router.min_score``/``full_score``) and a ramp from 0.4 to 0.5; a **learned gate**, which
  composes only when the best shard outscores its own held-out score, the best score one of
  its documents reaches against the shard without it (computed from that shard's documents
  only), alone and with the coverage gate's threshold as a floor;
- training: early stopping on a held-out split of each shard's own chunks (every 8th 64-word
  chunk; the held-out NLL is checked every 5 steps and the best weights kept); a KL term
  toward the base model on the shard's own tokens (``training.kl_weight`` 0.5 and 0.2).

A sweep of the gate's two thresholds justifies the defaults. Then a **second batch** (a new shard in the first group: are the first batch's
greedy answers unchanged?) and a **delete** (two documents of the first shard; the shard is
retrained without them and its statistics refit: do they sit inside the never-ingested
controls?).

Trained adapters are cached under ``--out/harm-adapters`` by a hash of what they saw, so a
rerun only evaluates. Writes results/harm.json and results/harm.png.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_result
from _knowledge import (
    Adapter,
    Rows,
    System,
    adapter_of,
    halves,
    load_model,
    run_from_command_line,
    train_adapter,
)
from _plots import scatter_chart
from manpages import ensure_corpus, read_jsonl
from packages import build as build_packages
from safetensors.torch import load_file, save_file

from adapterswap.config import EmbeddingSettings, LoraSettings, RouterSettings, TrainingSettings
from adapterswap.delete.verify_forget import verify_forget
from adapterswap.models.embedder import load_embedder
from adapterswap.route.stats import chunk_text, fit_shard_stats, score_shards
from adapterswap.train.loop import ShardTrainer, mean_token_nll, pack_documents, shard_seed
from adapterswap.types import AdapterRef

MAN_GROUPS = ("formats", "syscalls")
STDLIB = ("argparse", "json", "subprocess", "pickle", "tarfile", "doctest", "decimal", "typing")
ROUTERS = {
    "today": RouterSettings(min_score=0.2, full_score=0.2),
    "gate": RouterSettings(),
    "ramp": RouterSettings(min_score=0.4, full_score=0.5),
}
LEARNED = {"learned": -1.0, "learned + gate": RouterSettings().min_score}  # name: floor
METHODS = {  # name: (training, router)
    "today": ("full", "today"),
    "coverage gate": ("full", "gate"),
    "coverage ramp 0.4-0.5": ("full", "ramp"),
    "learned gate": ("full", "learned"),
    "learned + coverage gate": ("full", "learned + gate"),
    "early stop": ("early stop", "today"),
    "early stop + gate": ("early stop", "gate"),
    "KL": ("kl", "today"),
    "KL + gate": ("kl", "gate"),
    "KL 0.2": ("kl 0.2", "today"),
    "KL 0.2 + gate": ("kl 0.2", "gate"),
}
TRAININGS = {  # name: extra TrainingSettings
    "full": {},
    "early stop": {},
    "kl": {"kl_weight": 0.5},
    "kl 0.2": {"kl_weight": 0.2},
}
SWEEP = [(0.2, 0.2), (0.3, 0.3), (0.35, 0.35), (0.4, 0.4), (0.45, 0.45), (0.5, 0.5)]
SWEEP += [(0.3, 0.5), (0.35, 0.45), (0.4, 0.5), (0.4, 0.6)]  # ramps
GOALS = {"harm": 0.1, "general_ratio": 1.01, "kept": 0.9, "train_time_ratio": 1.5}
HOLD_OUT_EVERY, EVAL_EVERY, PATIENCE = 8, 5, 2
DELETE = 2  # documents deleted from the first shard


@dataclass(frozen=True)
class Corpus:
    """One corpus, split for the benchmark: a shard per group, a second batch, controls."""

    name: str
    batch1: dict[str, list[dict[str, Any]]]  # group -> documents of its first shard
    batch2: list[dict[str, Any]]  # a second shard of the first group
    controls: list[dict[str, Any]]  # never ingested, same groups

    @property
    def first(self) -> list[dict[str, Any]]:
        return [d for docs in self.batch1.values() for d in docs]


def man_facts(doc: dict[str, Any]) -> list[dict[str, str]]:
    """A manual page's fact: what it is for, from its NAME line ("open(2): open - ...")."""
    title, rest = doc["text"].split(": ", 1)
    names, dash, description = re.split(r" ([-—]) ", rest.split(". ", 1)[0], maxsplit=1)
    return [
        {
            "continuation": f"{title}: {names} {dash}",
            "question": f"Question: In the Linux manual, what does {title} do?\nAnswer:",
            "answer": f" {description}.",
        }
    ]


def load_corpora(corpus_dir: Path, out: Path, docs_per_shard: int) -> list[Corpus]:
    man = ensure_corpus(corpus_dir)
    controls = [dict(c, facts=man_facts(c)) for c in man.controls if c["group"] in MAN_GROUPS]
    by_group = {
        g: [dict(d, facts=man_facts(d)) for d in man.documents if d["group"] == g]
        for g in MAN_GROUPS
    }
    corpora = [_split("manual pages", by_group, controls, docs_per_shard)]
    packages = out / "packages"  # rebuilt each run: it is quick, and sized by --docs-per-shard
    build_packages(packages, per_group=2 * docs_per_shard, controls_per_group=docs_per_shard)
    rows = read_jsonl(packages / "documents.jsonl")
    groups = sorted({r["group"] for r in rows})
    by_group = {g: [r for r in rows if r["group"] == g] for g in groups}
    controls = read_jsonl(packages / "controls.jsonl")
    corpora.append(_split("packages", by_group, controls, docs_per_shard))
    return corpora


def _split(name: str, by_group: dict, controls: list, n: int) -> Corpus:
    first = next(iter(by_group))
    if n <= DELETE or len(by_group[first]) <= n or any(len(d) < n for d in by_group.values()):
        raise SystemExit(
            f"{name}: too few documents for a shard of {n} per group and a second batch; "
            "lower --docs-per-shard"
        )
    return Corpus(
        name, {g: d[:n] for g, d in by_group.items()}, by_group[first][n : 2 * n], controls
    )


def general_texts() -> list[str]:
    """Another domain: the opening words of standard-library module docstrings."""
    texts = [
        " ".join((inspect.getdoc(importlib.import_module(m)) or "").split()[:160]) for m in STDLIB
    ]
    return [t for t in texts if len(t.split()) >= 60]


class Trainer:
    """Trains (or reads back from the cache) one adapter per shard, by either method."""

    def __init__(self, spec: str, cache: Path, steps: int, out: Path) -> None:
        self.spec, self.cache, self.steps = spec, cache, steps
        self.store = out / "harm-adapters"
        self.store.mkdir(parents=True, exist_ok=True)

    def __call__(
        self, method: str, shard: str, version: int, group: str, texts: list[str]
    ) -> Adapter:
        ref, seed = AdapterRef(shard, version), shard_seed(0, shard)
        extra = TRAININGS[method]
        key = json.dumps([method, self.spec, self.steps, seed, texts] + ([extra] if extra else []))
        path = self.store / hashlib.sha256(key.encode()).hexdigest()[:24]
        if path.with_suffix(".json").exists():
            meta = json.loads(path.with_suffix(".json").read_text())
            state = load_file(str(path.with_suffix(".safetensors")))
            return Adapter(ref, group, state, meta["config"], meta["seconds"], meta["tokens"])
        training = TrainingSettings(max_steps=self.steps, **extra)
        if method != "early stop":
            adapter = train_adapter(
                self.spec, ref, group, texts, training, seed=seed, cache_dir=self.cache
            )
        else:
            adapter = train_early_stopped(self.spec, ref, group, texts, training, seed, self.cache)
        save_file(adapter.state, str(path.with_suffix(".safetensors")))
        meta = {"config": adapter.config, "seconds": adapter.seconds, "tokens": adapter.tokens}
        path.with_suffix(".json").write_text(json.dumps(meta, default=str))
        print(f"trained {shard} v{version} ({method}): {adapter.seconds:.0f} s", flush=True)
        return adapter


def train_early_stopped(
    spec: str,
    ref: AdapterRef,
    group: str,
    texts: list[str],
    training: TrainingSettings,
    seed: int,
    cache: Path,
) -> Adapter:
    """Train on the shard's chunks but every 8th; keep the weights whose held-out NLL is best."""
    chunks = [c for t in texts for c in chunk_text(t, 64, 0)]
    held = chunks[::HOLD_OUT_EVERY]
    kept = [c for i, c in enumerate(chunks) if i % HOLD_OUT_EVERY] or chunks
    loaded = load_model(spec, cache)
    blocks = pack_documents(loaded.tokenizer, kept, training.seq_len)
    trainer = ShardTrainer(loaded.model, blocks, LoraSettings(), training, seed=seed)
    started, best, best_state, stale = time.perf_counter(), math.inf, None, 0
    while not trainer.done and stale < PATIENCE:
        for _ in range(EVAL_EVERY):
            if not trainer.done:
                trainer.step()
        loss = statistics.mean(mean_token_nll(trainer.model, loaded.tokenizer, c) for c in held)
        if loss < best:
            best, stale = loss, 0
            best_state = adapter_of(trainer, ref, group, 0.0).state
        else:
            stale += 1
    adapter = adapter_of(trainer, ref, group, time.perf_counter() - started)
    return Adapter(
        ref, group, best_state or adapter.state, adapter.config, adapter.seconds, adapter.tokens
    )


@functools.cache  # a shard is served again for every method; its texts, and so this, do not change
def held_out_score(texts: tuple[str, ...], embedder: Any) -> float:
    """What "on topic but not covered" scores for a shard, from its own documents only: the
    best score any of its documents' chunks reaches against the shard without that document.
    A one-document shard has nothing to hold out against: -1, so only the floor applies."""
    per_doc = [embedder.embed(chunk_text(t)) for t in texts]
    best = -1.0
    if len(per_doc) < 2:
        return best
    for i, held in enumerate(per_doc):
        rest = np.concatenate([e for j, e in enumerate(per_doc) if j != i])
        stats = fit_shard_stats(rest, embedder.model_id)
        best = max(best, float(score_shards(held, [stats]).max()))
    return best


def router(system: System, name: str, held_out: dict[str, float]) -> Callable[[str], Rows]:
    """``name``'s mixture per prompt. The learned gates compose (as the router does, without
    a threshold) only when the best shard outscores its own ``held_out`` score (and ``floor``)."""
    if name in ROUTERS:
        return lambda p: system.routed(p, ROUTERS[name])
    always, floor = RouterSettings(min_score=-1.0, full_score=-1.0), LEARNED[name]

    def rows(prompt: str) -> Rows:
        scores = score_shards(system.query(prompt), [c.stats for c in system.candidates])
        best = int(scores.argmax())
        if scores[best] < max(floor, held_out[system.candidates[best].version.adapter_id]):
            return []
        return system.routed(prompt, always)

    return rows


def measure(
    system: System, corpus: Corpus, rows_for: Callable[[str], Rows], *, exact: bool
) -> dict:
    """Every measure for one way of composing (``rows_for(prompt)`` gives the mixture)."""

    def facts(docs: Sequence[dict[str, Any]], kind: str) -> list[float]:
        return [
            system.answer_nll(f[kind], f["answer"], rows_for(f[kind]))
            for d in docs
            for f in d["facts"]
        ]

    def passages(texts: Sequence[str]) -> list[float]:
        return [system.nll(t, rows_for(halves(t)[0])) for t in texts]

    result = {
        "covered": {k: facts(corpus.first, k) for k in ("continuation", "question")}
        | {"passage": passages([d["text"] for d in corpus.first])},
        "uncovered": {k: facts(corpus.controls, k) for k in ("continuation", "question")}
        | {"passage": passages([d["text"] for d in corpus.controls])},
        "general": passages(general_texts()),
    }
    if exact:
        result["answers"] = answers(system, corpus.first, rows_for)
    return result


def answers(
    system: System, docs: Sequence[dict[str, Any]], rows_for: Callable[[str], Rows]
) -> dict:
    """Greedy answers to every fact of ``docs``, as continuation and as question."""
    tokenizer = system.loaded.tokenizer
    out: dict[str, list[str]] = {"continuation": [], "question": [], "expected": []}
    for doc in docs:
        for fact in doc["facts"]:
            n = len(tokenizer(fact["answer"], add_special_tokens=False)["input_ids"])
            for kind in ("continuation", "question"):
                out[kind].append(system.greedy(fact[kind], n, rows_for(fact[kind])))
            out["expected"].append(fact["answer"])
    return out


def summarise(m: dict, base: dict, today: dict | None) -> dict[str, Any]:
    """Help, harm and exact match of one method's measures against the base model's."""

    def delta(a: list[float], b: list[float]) -> float:  # mean per-item NLL gain of a over b
        return statistics.mean(y - x for x, y in zip(a, b, strict=True))

    help_ = {k: delta(m["covered"][k], base["covered"][k]) for k in m["covered"]}
    harm = {k: -delta(m["uncovered"][k], base["uncovered"][k]) for k in m["uncovered"]}
    harm["mean"] = statistics.mean(harm.values())
    out: dict[str, Any] = {
        "help": help_,
        "harm": harm,
        "general_ppl_ratio": math.exp(
            statistics.mean(m["general"]) - statistics.mean(base["general"])
        ),
    }
    if today is not None:
        out["kept"] = {k: help_[k] / today["help"][k] for k in ("continuation", "question")}
    if "answers" in m:
        expected = [a.strip() for a in m["answers"]["expected"]]
        out["exact_match"] = {
            k: statistics.mean(
                g.strip() == e for g, e in zip(m["answers"][k], expected, strict=True)
            )
            for k in ("continuation", "question")
        }
    return out


def run(
    corpus_dir: Path, out: Path, *, spec: str, cache: Path, steps: int, docs_per_shard: int
) -> dict:
    embedder = load_embedder(EmbeddingSettings())
    train = Trainer(spec, cache, steps, out)
    report: dict[str, Any] = {
        "model": spec,
        "steps": steps,
        "docs_per_shard": docs_per_shard,
        "corpora": {},
    }
    for corpus in load_corpora(corpus_dir, out, docs_per_shard):
        report["corpora"][corpus.name] = one_corpus(corpus, spec, cache, embedder, train)
    write_result("harm", report, out)
    plot(report, out)
    return report


def plot(report: dict, out: Path) -> None:
    """results/harm.png: each method's help against its harm, per corpus."""
    points = {
        f"{method} ({name})": (
            statistics.mean(r["methods"][method]["help"][k] for k in ("continuation", "question")),
            r["methods"][method]["harm"]["mean"],
        )
        for name, r in report["corpora"].items()
        for method in METHODS
    }
    scatter_chart(
        out / "harm.png",
        title="Help on covered facts against harm on uncovered ones (nats/token vs base model)",
        points=points,
        xlabel="help: covered answer NLL gain (continuation and question)",
        ylabel="harm: uncovered NLL loss",
        hline=GOALS["harm"],
    )


def one_corpus(corpus: Corpus, spec: str, cache: Path, embedder: Any, train: Trainer) -> dict:
    print(f"== {corpus.name}", flush=True)
    capacity = 2 * (len(corpus.batch1) + 2)
    system = System(spec, embedder, capacity, cache_dir=cache)
    shards = {g: f"{g}.b0001.000" for g in corpus.batch1}
    adapters = {
        t: {
            g: train(t, shards[g], 1, g, [d["text"] for d in docs])
            for g, docs in corpus.batch1.items()
        }
        for t in TRAININGS
    }
    base = measure(system, corpus, lambda p: [], exact=True)

    held_out: dict[str, float] = {}  # adapter id -> its shard's held-out score

    def serve(t: str, extra: Sequence[tuple[Adapter, list[str]]] = ()) -> None:
        system.candidates = []
        shards = [(adapters[t][g], [d["text"] for d in docs]) for g, docs in corpus.batch1.items()]
        for adapter, texts in [*shards, *extra]:
            system.add(adapter, texts)
            held_out[adapter.ref.id] = held_out_score(tuple(texts), embedder)

    initial: dict[str, dict] = {}
    for method, (t, r) in METHODS.items():
        serve(t)
        initial[method] = measure(system, corpus, router(system, r, held_out), exact=True)
    serve("full")
    sweep = {}
    for low, full in SWEEP:
        settings = RouterSettings(min_score=low, full_score=full)
        m = measure(system, corpus, lambda p, s=settings: system.routed(p, s), exact=False)
        sweep[f"{low}-{full}"] = summarise(m, base, None)
    today = summarise(initial["today"], base, None)
    methods = {name: summarise(m, base, today) for name, m in initial.items()}
    seconds = {t: statistics.mean(a.seconds for a in adapters[t].values()) for t in adapters}
    for name, (t, _) in METHODS.items():
        methods[name]["train_seconds_per_shard"] = seconds[t]
        methods[name]["train_time_ratio"] = seconds[t] / seconds["full"]
    later = {
        name: after_batch_and_delete(
            system, corpus, train, serve, t, router(system, r, held_out), initial[name]
        )
        for name, (t, r) in METHODS.items()
    }
    for name in METHODS:
        methods[name] |= later[name]
        print(name, json.dumps(_brief(methods[name])), flush=True)
    return {
        "methods": methods,
        "sweep": sweep,
        "base_exact_match": summarise(base, base, None)["exact_match"],
    }


def after_batch_and_delete(
    system: System,
    corpus: Corpus,
    train: Trainer,
    serve: Callable,
    t: str,
    rows_for: Callable[[str], Rows],
    before: dict,
) -> dict:
    """The second batch's and the delete's guarantees, for one method."""
    group = next(iter(corpus.batch1))
    batch2_texts = [d["text"] for d in corpus.batch2]
    batch2 = train(t, f"{group}.b0002.000", 1, group, batch2_texts)
    serve(t, [(batch2, batch2_texts)])
    after = answers(system, corpus.first, rows_for)
    unchanged = [
        a == b
        for k in ("continuation", "question")
        for a, b in zip(after[k], before["answers"][k], strict=True)
    ]
    first = corpus.batch1[group]
    deleted, kept = first[:DELETE], first[DELETE:]
    kept_texts = [d["text"] for d in kept]
    retrained = train(t, f"{group}.b0001.000", 2, group, kept_texts)
    serve(t, [(batch2, batch2_texts), (retrained, kept_texts)])
    controls = [c["text"] for c in corpus.controls if c["group"] == group]
    scorer = lambda texts, g: [system.nll(x, rows_for(halves(x)[0])) for x in texts]  # noqa: E731
    forget = [verify_forget(d["id"], group, d["text"], controls, scorer) for d in deleted]
    for report in forget:
        print(report.summary(), flush=True)
    return {
        "second_batch": {"first_batch_answers_unchanged": statistics.mean(unchanged)},
        "delete": {
            "deleted_inside_controls": all(f.passed for f in forget),
            "deleted": {
                f.doc_id: {"nll": f.deleted_nll, "percentile": f.percentile} for f in forget
            },
            "controls": [min(forget[0].control_nlls), max(forget[0].control_nlls)],
        },
    }


def _brief(summary: dict) -> dict:
    keep = ("help", "harm", "general_ppl_ratio", "kept", "exact_match", "train_time_ratio")
    return {k: summary[k] for k in keep if k in summary} | {
        "unchanged": summary["second_batch"]["first_batch_answers_unchanged"],
        "forgotten": summary["delete"]["deleted_inside_controls"],
    }


def main() -> None:
    run_from_command_line(run, __doc__, steps=(int, 40), docs_per_shard=(int, 8))


if __name__ == "__main__":
    main()
