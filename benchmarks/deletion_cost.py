"""What a deletion costs: revocation latency to every replica, and retraining one shard vs all.

    python benchmarks/deletion_cost.py [--deletes 50] [--replicas 2] [--steps 10]

1. Revocation latency. A Serve app with ``--replicas`` model replicas (tiny random model: the
   barrier does not depend on the model) serves a home of ``--deletes`` documents. Each
   ``DELETE /v1/documents/{id}`` returns once every replica has acknowledged the revocation's
   epoch; reported: the HTTP round trip and the server's wait for the acknowledgements, p50
   and p99. The documents are never trained, so the delete jobs behind them are trivial and
   the figure is the barrier's own (poll interval ``serve.epoch_poll_s`` = 0.1 s by default).
2. Cost of removal, on the embedded model and the example corpus (examples/batch1): train
   every shard, then delete one document and let the delete job retrain its shard. Wall time
   and training tokens of one shard against all, beside the paper's "up to 80x cheaper".

Writes benchmarks/results/deletion_cost.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import ray
from _common import free_port, write_result
from ray import serve

from adapterswap.catalog import Catalog
from adapterswap.config import load_config
from adapterswap.deletion import request_delete, run_deletion
from adapterswap.embedding import load_embedder
from adapterswap.ingest import ingest_files, ingest_records
from adapterswap.readers import RawRecord
from adapterswap.registry import AdapterRegistry
from adapterswap.serve_app import build_app
from adapterswap.train_job import run_training

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RESULT = Path(__file__).parent / "results" / "deletion_cost.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def revocation_latency(root: Path, deletes: int, replicas: int) -> dict[str, Any]:
    overrides = ["model.spec=tiny-random", f"model.cache_dir={root / 'models'}"]
    overrides += ["sharding.strategy=sequential", "ray.replica_num_cpus=0.2"]
    config = load_config(home=str(root / "latency"), environ={}, overrides=overrides)
    records = [
        RawRecord(f"d{i}", {"id": f"doc-{i}", "text": f"Fact number {i}.", "group": "hr"})
        for i in range(deletes)
    ]
    ingest_records(records, config, embed=None)
    key = AdapterRegistry(config.db_path).create_key("root", ["hr"], admin=True)[0]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"home": config.home, "overrides": overrides, "num_replicas": replicas}),
        name="adapterswap",
        route_prefix="/",
    )
    round_trip, acknowledged = [], []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for i in range(deletes):
            started = time.perf_counter()
            answer = client.delete(f"/v1/documents/doc-{i}", headers=headers)
            round_trip.append(time.perf_counter() - started)
            answer.raise_for_status()
            acknowledged.append(answer.json()["acknowledged_after_s"])
    serve.delete("adapterswap")
    result = {
        "replicas": replicas,
        "deletes": deletes,
        "round_trip_s": {"p50": percentile(round_trip, 50), "p99": percentile(round_trip, 99)},
        "acknowledged_after_s": {
            "p50": percentile(acknowledged, 50),
            "p99": percentile(acknowledged, 99),
        },
        "epoch_poll_s": config.serve.epoch_poll_s,
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


def removal_cost(root: Path, steps: int) -> dict[str, Any]:
    cache = Path("~/.adapterswap/models").expanduser()
    config = load_config(
        home=str(root / "removal"),
        environ={},
        overrides=[f"model.cache_dir={cache}", f"training.max_steps={steps}"],
    )
    embed = load_embedder(config.embedding).embed
    ingest_files(sorted((EXAMPLES / "batch1").glob("*.jsonl")), config, embed=embed)
    registry = AdapterRegistry(config.db_path)
    started = time.perf_counter()
    everything = run_training(config, registry)
    all_s = time.perf_counter() - started
    victim = sorted(Catalog(config.storage).ids())[0]
    started = time.perf_counter()
    request = request_delete(registry, Catalog(config.storage), [victim], "bench", "bench")
    report = run_deletion(config, registry, job_id=request.job_id)
    one_s = time.perf_counter() - started
    all_tokens = sum(t["tokens"] for t in everything.trained)
    one_tokens = sum(t["tokens"] for t in report.training["trained"])
    summaries = Catalog(config.storage).shard_summaries()
    result = {
        "shards": len(everything.trained),
        "steps_per_shard": steps,
        "retrain_all": {"wall_s": all_s, "train_tokens": all_tokens},
        "retrain_one": {"wall_s": one_s, "train_tokens": one_tokens},
        "wall_ratio": all_s / one_s,
        "token_ratio": all_tokens / one_tokens,
        "corpus_tokens_over_shard_tokens": sum(s.tokens for s in summaries)
        / max(s.tokens for s in summaries),
        "paper": "up to 80x cheaper (one shard of many)",
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deletes", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="training steps per shard")
    parser.add_argument(
        "--only", choices=["revocation", "removal"], help="run one part; keep the other's JSON"
    )
    args = parser.parse_args()
    previous = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            latency = previous.get("revocation")
            if args.only != "removal":
                latency = revocation_latency(Path(tmp), args.deletes, args.replicas)
                serve.shutdown()
            removal = previous.get("removal")
            if args.only != "revocation":
                removal = removal_cost(Path(tmp), args.steps)
        finally:
            ray.shutdown()
    write_result("deletion_cost", {"revocation": latency, "removal": removal})
    print(
        f"revocation p50 {latency['acknowledged_after_s']['p50'] * 1000:.0f} ms, p99 "
        f"{latency['acknowledged_after_s']['p99'] * 1000:.0f} ms over {args.deletes} deletes, "
        f"{args.replicas} replicas; removal: one shard {removal['wall_ratio']:.1f}x faster, "
        f"{removal['token_ratio']:.1f}x fewer tokens than all {removal['shards']} shards"
    )


if __name__ == "__main__":
    main()
