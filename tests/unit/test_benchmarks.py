"""The evaluation benchmarks' code paths, end to end on a tiny corpus, so they do not rot.

The corpus is built by benchmarks/manpages.py (groff included) from manual pages this test
writes itself; the knowledge benchmarks train the tiny random model for a step or two. The
numbers mean nothing here; what is checked is that every script runs, writes its JSON and
PNG, and that the properties that hold by construction hold (held-out text never ingested,
AdapterSwap's first-batch curve exactly flat, one shard cheaper than all).
"""

from __future__ import annotations

import gzip
import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TOPICS = {
    "2": "kernel process signal thread memory mapping descriptor socket pipe scheduler",
    "3": "string buffer locale number conversion character array allocation stream",
    "5": "configuration file line field entry option directory path syntax comment",
    "7": "protocol network address standard encoding terminal history charset",
}
SUBJECTS = ["harbour", "lantern", "orchard", "meadow", "glacier", "canyon", "violin", "falcon",
            "copper", "marble", "willow", "thunder", "saffron", "compass", "anchor", "quartz"]  # fmt: skip


def _page(name: str, section: str, rng: random.Random) -> str:
    """A roff manual page of invented text: its section's topic words plus its own subjects."""
    topic = TOPICS[section].split()
    own = rng.sample(SUBJECTS, 2)
    sentences = [
        f"The {own[i % 2]} {rng.choice(topic)} keeps the {rng.choice(topic)} near the "
        f"{own[(i + 1) % 2]} {rng.choice(topic)} when the {rng.choice(topic)} is ready."
        for i in range(10)
    ]
    return (
        f'.TH {name.upper()} {section} 2026-01-01 "test" "Test Manual"\n'
        f".SH NAME\n{name} \\- the {own[0]} and {own[1]} {topic[0]}\n"
        f".SH DESCRIPTION\n{' '.join(sentences[:5])}\n.PP\n{' '.join(sentences[5:])}\n"
        f".SH SEE ALSO\nnothing\n"
    )


def _run(script: str, *args: str, cwd: Path = BENCHMARKS) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("man")
    rng = random.Random(0)
    for section in TOPICS:
        (root / f"man{section}").mkdir()
        for i in range(6):
            name = f"page{section}{i}"
            data = _page(name, section, rng).encode()
            (root / f"man{section}" / f"{name}.{section}.gz").write_bytes(gzip.compress(data))
        alias = f".so man{section}/page{section}0.{section}\n".encode()  # skipped, not a page
        (root / f"man{section}" / f"alias{section}.{section}.gz").write_bytes(gzip.compress(alias))
        (root / f"man{section}" / f"short{section}.{section}").write_text(
            f".TH SHORT {section}\n.SH NAME\nshort \\- no description\n"
        )  # skipped: no DESCRIPTION
    out = tmp_path_factory.mktemp("corpus")
    _run("manpages.py", "--root", str(root), "--out", str(out), "--per-group", "4",
         "--controls-per-group", "2", "--doc-words", "60", "--query-words", "16",
         "--min-words", "100")  # fmt: skip
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_holds_out_queries_and_controls(corpus):
    docs, queries = _jsonl(corpus / "documents.jsonl"), _jsonl(corpus / "queries.jsonl")
    controls = _jsonl(corpus / "controls.jsonl")
    groups = {"syscalls", "library", "formats", "overview"}
    assert len(docs) == len(queries) == 16 and len(controls) == 8
    assert {d["group"] for d in docs} == {c["group"] for c in controls} == groups
    ids = {d["id"] for d in docs}
    assert {q["doc_id"] for q in queries} == ids and not ids & {c["id"] for c in controls}
    assert not any(i.startswith(("alias", "short")) for i in ids | {c["id"] for c in controls})
    text = {d["id"]: d["text"] for d in docs}
    for q in queries:  # the query is the passage right after the ingested words, never ingested
        assert len(q["text"].split()) == 16 and q["text"] not in text[q["doc_id"]]
    first = docs[0]
    name, section = first["id"].rsplit(".", 1)
    assert first["text"].startswith(f"{name}({section}): {name} - the ")
    assert len(first["text"].split(". ", 1)[1].split()) == 60


def test_corpus_errors_name_what_is_missing(tmp_path):
    done = subprocess.run(
        [sys.executable, "manpages.py", "--root", str(tmp_path), "--out", str(tmp_path / "c")],
        cwd=BENCHMARKS, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"{tmp_path}: no manual pages for sections 2, 3, 5, 7" in done.stderr


def test_routing_benchmark(corpus, tmp_path):
    _run(
        "eval_routing.py", "--corpus", str(corpus), "--out", str(tmp_path), "--max-shard-docs", "2"
    )
    result = json.loads((tmp_path / "routing.json").read_text())
    for strategy in ("topical", "sequential"):
        row = result["results"][strategy]
        assert row["shards"] == 8 and row["queries"] == 16
        assert 0 <= row["top1"] <= row["top3"] <= 1
    # Each invented page shares its own two subject words with its held-out passage.
    assert result["results"]["topical"]["top3"] >= 0.75
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"


def test_knowledge_benchmarks(corpus, tmp_path, tiny_cache):
    _run("eval_knowledge.py", "--corpus", str(corpus), "--out", str(tmp_path), "--model",
         "tiny-random", "--model-cache", str(tiny_cache), "--per-group", "4",
         "--docs-per-shard", "2", "--steps", "2", "--delete", "1")  # fmt: skip
    mixture = json.loads((tmp_path / "mixture.json").read_text())
    ppl = mixture["perplexity"]
    assert mixture["documents"] == 16 and mixture["shards"] == 8
    assert set(ppl) == {"correct adapter", "routed (ours)", "uniform top-3", "base model"}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert mixture["routed_over_correct"] == pytest.approx(
        ppl["routed (ours)"] / ppl["correct adapter"]
    )
    removal = json.loads((tmp_path / "removal.json").read_text())
    (doc_id, row), *_ = removal["deleted"].items()
    assert len(removal["deleted"]) == 1 and len(row["control_nlls"]) == 2
    group = {d["id"]: d["group"] for d in _jsonl(corpus / "documents.jsonl")}[doc_id]
    assert removal["shard"].startswith(f"{group}.")  # the deleted document was in that shard
    cost = removal["cost"]
    assert cost["all_shards"]["shards"] == 8 and cost["tokens_ratio"] > 1
    for name in ("mixture.png", "removal.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_forgetting_benchmark(corpus, tmp_path, tiny_cache):
    _run("eval_forgetting.py", "--corpus", str(corpus), "--out", str(tmp_path), "--model",
         "tiny-random", "--model-cache", str(tiny_cache), "--group", "library",
         "--batches", "3", "--docs-per-batch", "1", "--epochs", "2")  # fmt: skip
    result = json.loads((tmp_path / "forgetting.json").read_text())
    curves, tokens = result["first_batch_perplexity"], result["training_tokens"]
    assert all(len(ys) == 3 for ys in curves.values())
    # The first batch's adapter, served from the bank while later adapters are loaded beside
    # it, gives the same perplexity after every batch: nothing touched its weights or slot.
    assert result["adapterswap_flat"] and len(set(curves["AdapterSwap (batch-1 adapter)"])) == 1
    assert curves["chronological"][0] == pytest.approx(curves["AdapterSwap (batch-1 adapter)"][0])
    assert tokens["AdapterSwap"] == sorted(set(tokens["AdapterSwap"]))  # strictly increasing
    assert tokens["retrain on all so far"][-1] > tokens["AdapterSwap"][-1]
    assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


def test_packages_corpus_facts_are_in_their_documents_and_asked_otherwise(tmp_path):
    _run("packages.py", "--out", str(tmp_path), "--per-group", "3", "--controls-per-group", "2")
    docs, controls = _jsonl(tmp_path / "documents.jsonl"), _jsonl(tmp_path / "controls.jsonl")
    assert len(docs) == 6 and len(controls) == 4
    assert not {d["id"] for d in docs} & {c["id"] for c in controls}
    for row in docs + controls:
        assert len(row["facts"]) == 2
        for fact in row["facts"]:
            # The continuation is the document's own words, and the answer follows them in it.
            assert row["text"].startswith(fact["continuation"] + fact["answer"])
            assert fact["continuation"] not in fact["question"]
            assert row["id"] in fact["question"] and fact["answer"].strip()


def test_harm_benchmark(corpus, tmp_path, tiny_cache):
    _run("eval_harm.py", "--corpus", str(corpus), "--out", str(tmp_path), "--model",
         "tiny-random", "--model-cache", str(tiny_cache), "--docs-per-shard", "3",
         "--steps", "1")  # fmt: skip
    result = json.loads((tmp_path / "harm.json").read_text())
    assert set(result["corpora"]) == {"manual pages", "packages"}
    for corpus_result in result["corpora"].values():
        methods = corpus_result["methods"]
        assert set(methods) == {
            "today",
            "coverage gate",
            "coverage ramp 0.4-0.5",
            "learned gate",
            "learned + coverage gate",
            "early stop",
            "early stop + gate",
            "KL",
            "KL + gate",
            "KL 0.2",
            "KL 0.2 + gate",
        }
        for row in methods.values():
            assert set(row["help"]) == {"continuation", "question", "passage"}
            assert row["harm"]["mean"] == pytest.approx(
                statistics.mean(row["harm"][k] for k in ("continuation", "question", "passage"))
            )
            assert all(0 <= v <= 1 for v in row["exact_match"].values())
            assert row["general_ppl_ratio"] > 0 and row["train_seconds_per_shard"] > 0
            assert isinstance(row["delete"]["deleted_inside_controls"], bool)
            assert 0 <= row["second_batch"]["first_batch_answers_unchanged"] <= 1
        assert methods["today"]["kept"] == {"continuation": 1.0, "question": 1.0}
        assert methods["today"]["train_time_ratio"] == 1.0
        assert len(corpus_result["sweep"]) >= 2
    assert (tmp_path / "harm.png").read_bytes()[:4] == b"\x89PNG"
    # Every adapter is cached by what it saw: per corpus and training method (full, early
    # stop, KL 0.5 and 0.2), a shard per group, the second batch's and the retrained one.
    assert len(list((tmp_path / "harm-adapters").glob("*.safetensors"))) == 2 * 4 * (2 + 2)


def test_serving_table_from_the_committed_results(tmp_path):
    done = _run("eval_serving.py", "--out", str(tmp_path))
    table = json.loads((tmp_path / "serving.json").read_text())["table"]
    assert {"measure", "value", "unit", "goal", "met"} == set(table[0])
    assert "| server: ours / plain-peft server, completion tok/s |" in done.stdout
    assert (tmp_path / "serving.png").read_bytes()[:4] == b"\x89PNG"
    missing = subprocess.run(
        [sys.executable, "eval_serving.py", "--results", str(tmp_path / "none")],
        cwd=BENCHMARKS, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode != 0 and "serve_throughput.json" in missing.stderr
