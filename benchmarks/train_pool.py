"""Training many small shards: the pool of long-lived workers against one trainer per shard.

    python benchmarks/train_pool.py [--sizes 10 100 500] [--old-sizes 10 100] [--steps 2]

For each size N, N small shards (two short synthetic documents each, over five groups) are
ingested into a fresh home and trained by a full training job (register, train, publish)
on a local 2-CPU Ray cluster, 1 CPU per worker, so two shards train at a time on either path:

- pool: ``actors.train_pool.train_shards_in_pool``, one trainer of 2 workers that take
  shards from the queue (the default path of ``adapterswap train``);
- one trainer per shard: ``actors.train_launcher.train_shards_one_trainer_each`` (the path
  before the pool, now the large-shard path), two shards' trainers at a time. Starting all
  N at once, as that launcher does with the shards it is given, would start N Ray Train
  controller processes; at N = 100 that is more memory than this machine has.

Per size and path: wall time, the seconds spent inside training steps (from the progress
events: tokens / tokens_per_s), shards per hour, and the per-shard overhead: the worker
time each shard costs beyond its training steps, ``(wall x 2 workers - step seconds) / N``.
Where both paths ran, the adapters' weight files are compared byte for byte, shard by shard.
Writes benchmarks/results/train_pool.json and train_pool.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from _common import RESULTS, write_result
from _plots import bar_chart
from _training import benchmark_config

from actors.train_launcher import train_shards_one_trainer_each
from actors.train_pool import train_shards_in_pool
from adapterswap.catalog.ingest import ingest_files
from adapterswap.config import AdapterSwapConfig
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training
from adapterswap.train.launcher import ShardOutcome
from adapterswap.train.shard import ShardRun

SLOTS = 2  # workers training at once on either path: 2 CPUs, 1 CPU per worker
GROUPS = 5
DOCS_PER_SHARD = 2


def ingest_shards(config: AdapterSwapConfig, n_shards: int, directory: Path) -> None:
    """N shards of two short documents each (sequential sharding, two documents a shard)."""
    rows = []
    for i in range(n_shards * DOCS_PER_SHARD):
        group = f"g{i % GROUPS}"
        text = f"Record {i}: the {group} archive box {i * 7} is kept on shelf {i % 13}."
        rows.append({"id": f"d{i:05d}", "text": text, "group": group})
    path = directory / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest_files([path], config, embed=None)


def one_trainer_each_two_at_a_time(
    runs: list[ShardRun], config: AdapterSwapConfig, *, on_progress: Any = None
) -> list[ShardOutcome]:
    """The pre-pool path, a trainer per shard, ``SLOTS`` trainers running at a time."""
    with ThreadPoolExecutor(max_workers=SLOTS) as threads:
        done = threads.map(
            lambda run: train_shards_one_trainer_each([run], config, on_progress=on_progress),
            runs,
        )
        return [outcome for outcomes in done for outcome in outcomes]


def timed_job(config: AdapterSwapConfig, launcher: Any) -> dict[str, Any]:
    """One training job of every pending shard through ``launcher``: its timings."""
    events: list[dict[str, Any]] = []
    started = time.perf_counter()
    report = run_training(
        config, AdapterRegistry(config.db_path), train_shards=launcher, on_progress=events.append
    )
    wall = time.perf_counter() - started
    assert not report.failed, report.failed[:3]
    n = len(report.trained)
    step_s = sum(e["tokens"] / e["tokens_per_s"] for e in events)
    return {
        "shards": n,
        "wall_s": round(wall, 1),
        "step_s": round(step_s, 1),
        "shards_per_hour": round(3600 * n / wall),
        "overhead_per_shard_s": round((wall * SLOTS - step_s) / n, 2),
    }


def adapter_bytes(config: AdapterSwapConfig) -> dict[str, bytes]:
    root = Path(StorageLayout.from_config(config).adapters().path)
    return {p.parent.parent.name: p.read_bytes() for p in root.glob(f"*/*/{ADAPTER_WEIGHTS}")}


def timed_path(
    args: argparse.Namespace, path: str, n: int, root: Path, results: dict[int, dict[str, Any]]
) -> AdapterSwapConfig:
    """Train N fresh shards in a home of their own through ``path`` into ``results[n][path]``;
    the home's config."""
    home = root / f"{path}-{n}"
    home.mkdir()
    config = benchmark_config(
        str(home / "home"),
        args.model,
        args.steps,
        1,
        f"sharding.max_shard_docs={DOCS_PER_SHARD}",
        f"ray.train_pool_workers={SLOTS}",
    )
    ingest_shards(config, n, home)
    launcher = {
        "pool": train_shards_in_pool,
        "one_trainer_per_shard": one_trainer_each_two_at_a_time,
    }
    results.setdefault(n, {"shards": n})[path] = timed_job(config, launcher[path])
    print(f"{n:4d} shards, {path:<22} {results[n][path]}", flush=True)
    return config


def compare(result: dict[str, Any], pooled: AdapterSwapConfig, alone: AdapterSwapConfig) -> None:
    """Same bytes shard by shard, and the overhead ratio, of one size's two paths."""
    mine, theirs = adapter_bytes(pooled), adapter_bytes(alone)
    result["same_bytes"] = f"{sum(mine[k] == theirs.get(k) for k in mine)}/{len(mine)}"
    result["overhead_ratio"] = round(
        result["one_trainer_per_shard"]["overhead_per_shard_s"]
        / result["pool"]["overhead_per_shard_s"],
        1,
    )


def save(args: argparse.Namespace, measured: dict[int, dict[str, Any]]) -> None:
    """Write what is measured so far (after every run: the old path at 100 takes long)."""
    results = [measured[n] for n in sorted(measured)]
    write_result(
        "train_pool",
        {
            "model": args.model,
            "steps": args.steps,
            "workers": SLOTS,
            "old_sizes": args.old_sizes,
            "results": results,
        },
    )
    plot(results)


def plot(results: list[dict[str, Any]]) -> None:
    labels = {"pool": "pool", "one_trainer_per_shard": "one trainer per shard"}
    groups = {
        f"{r['shards']} shards": {labels[k]: r[k]["overhead_per_shard_s"] for k in labels if k in r}
        for r in results
    }
    bar_chart(
        RESULTS / "train_pool.png",
        title="Per-shard overhead (worker seconds beyond training steps; 2 workers, 2 CPUs)",
        groups=groups,
        ylabel="seconds per shard (log)",
        hlines={"goal: 2 s": 2.0},
        log=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument(
        "--old-sizes", type=int, nargs="*", default=[10, 100], help="sizes to run the old path at"
    )
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[int, dict[str, Any]] = {}
    pooled = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Every pool size first, then the slow path, so a long run keeps what it measured.
        for n in args.sizes:
            pooled[n] = timed_path(args, "pool", n, Path(tmp), results)
            save(args, results)
        for n in args.old_sizes:
            alone = timed_path(args, "one_trainer_per_shard", n, Path(tmp), results)
            if n in pooled:
                compare(results[n], pooled[n], alone)
            save(args, results)
    ray.shutdown()
    for n in sorted(results):
        print(json.dumps(results[n]))


if __name__ == "__main__":
    main()
