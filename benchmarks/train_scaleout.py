"""Training scale-out: wall time for N shards with one worker at a time vs two at once.

    python benchmarks/train_scaleout.py [--model embedded] [--shards 6] [--steps 5]

The same N shards (the example corpus, split sequentially) are trained twice through Ray
Train on a fresh home: once with 2 CPUs per worker (one worker fits on this 2-core machine,
so shards run one after another), once with 1 CPU per worker (two shards at once).
Prints shards per hour for both and their ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray
from _common import write_result
from _training import benchmark_config, train_with_ray

from adapterswap.catalog.ingest import ingest_files

CORPUS = sorted((Path(__file__).resolve().parents[1] / "examples" / "batch1").glob("*.jsonl"))


def timed_run(model: str, shards: int, steps: int, cpus_per_worker: float) -> dict:
    with tempfile.TemporaryDirectory() as home:
        # The corpus holds 3 groups of 12 documents; shards never mix groups.
        max_docs = -(-12 // max(1, shards // 3))
        config = benchmark_config(
            home, model, steps, cpus_per_worker, f"sharding.max_shard_docs={max_docs}"
        )
        ingest_files(CORPUS, config, embed=None)
        report, wall = train_with_ray(config)
    n = len(report.trained)
    return {
        "cpus_per_worker": cpus_per_worker,
        "shards": n,
        "wall_s": round(wall, 1),
        "shards_per_hour": round(3600 * n / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--shards", type=int, default=6, help="a multiple of 3 (groups)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    one = timed_run(args.model, args.shards, args.steps, cpus_per_worker=2)
    two = timed_run(args.model, args.shards, args.steps, cpus_per_worker=1)
    ray.shutdown()
    ratio = two["shards_per_hour"] / one["shards_per_hour"]
    for label, run in (("1 worker at a time", one), ("2 workers at once", two)):
        print(
            f"{label:<19} {run['shards']} shards in {run['wall_s']:6.1f} s = {run['shards_per_hour']:6.1f} shards/hour"
        )
    print(f"ratio 2 workers / 1 worker, shards per hour: {ratio:.2f}")
    write_result(
        "train_scaleout",
        {
            "model": args.model,
            "steps": args.steps,
            "one_worker": one,
            "two_workers": two,
            "ratio": round(ratio, 2),
        },
    )


if __name__ == "__main__":
    main()
