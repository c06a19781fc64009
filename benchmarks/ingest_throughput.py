"""Ingest throughput: documents per second for N small documents, topical vs sequential planning.

    python benchmarks/ingest_throughput.py [--docs 10000] [--out benchmarks/results/ingest.json]

Each strategy ingests the same JSONL file into a fresh home; the topical run includes
embedding every document with the embedded all-MiniLM-L6-v2 (loaded before timing).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from adapterswap.catalog.ingest import ingest_files
from adapterswap.config import load_config
from adapterswap.models.embedder import load_embedder

GROUPS = ["hr", "engineering", "finance", "legal"]
WORDS = [
    "sensor",
    "buoy",
    "tide",
    "budget",
    "leave",
    "badge",
    "firmware",
    "vendor",
    "audit",
    "salary",
    "harbour",
    "vessel",
]


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(n):
            text = (
                " ".join(rng.choice(WORDS) for _ in range(30))
                + f". Fact {i} is {rng.randint(0, 10**6)}."
            )
            out.write(
                json.dumps({"id": f"doc-{i}", "text": text, "group": GROUPS[i % len(GROUPS)]})
                + "\n"
            )


def time_ingest(corpus: Path, strategy: str) -> dict:
    with tempfile.TemporaryDirectory() as home:
        config = load_config(home=home, overrides=[f"sharding.strategy={strategy}"], environ={})
        embed = load_embedder(config.embedding).embed if strategy == "topical" else None
        started = time.perf_counter()
        result = ingest_files([corpus], config, embed=embed)
        seconds = time.perf_counter() - started
    return {
        "strategy": strategy,
        "docs": result.accepted,
        "shards": len(result.shards),
        "seconds": round(seconds, 3),
        "docs_per_s": round(result.accepted / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ingest.json"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        make_corpus(corpus, args.docs)
        runs = [time_ingest(corpus, s) for s in ("sequential", "topical")]
    ratio = runs[1]["docs_per_s"] / runs[0]["docs_per_s"]
    for run in runs:
        print(
            f"{run['strategy']:<11} {run['docs']} docs -> {run['shards']} shards in {run['seconds']:.2f} s "
            f"= {run['docs_per_s']:.0f} docs/s"
        )
    print(f"topical / sequential throughput: {ratio:.3f}")
    report = {
        "benchmark": "ingest_throughput",
        "machine": f"{platform.machine()} {platform.processor()} "
        f"{__import__('os').cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "topical_over_sequential": round(ratio, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
