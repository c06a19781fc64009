"""What a deletion costs: revocation latency to every replica, and retraining one shard vs all.

    python benchmarks/deletion_cost.py [--deletes 50] [--replicas 2] [--steps 10]
        [--only revocation|in_flight|removal] [--in-flight-deletes 12] [--load-clients 3]

1. Revocation latency. A Serve app with ``--replicas`` model replicas (tiny random model: the
   barrier does not depend on the model) serves a home of ``--deletes`` documents. Each
   ``DELETE /v1/documents/{id}`` returns once every replica has acknowledged the revocation's
   epoch; reported: the HTTP round trip and the server's wait for the acknowledgements, p50
   and p99. The documents are never trained, so the delete jobs behind them are trivial and
   the figure is the barrier's own (poll interval ``serve.epoch_poll_s`` = 0.1 s by default).
2. Removal in flight (``--only in_flight``), through the same kind of Serve app under a
   steady load (``--load-clients`` threads asking for short completions in a loop, on an
   adapter that is never deleted). For each of ``--in-flight-deletes`` documents, each with
   its own adapter, a long generation on that adapter is started (a stream for even ones; a
   non-streaming completion routed over every hr adapter for odd ones: a stream holds its
   replica, so the two do not share a batch), and once it is under way (a few chunks
   streamed; 0.3 s) the document is deleted. Reported: the text chunks a stream delivered
   after the DELETE returned (a client-side upper bound on the tokens produced with the
   revoked version after the acknowledgement; goal 0), how streams ended (the
   ``adapter_revoked`` error event), completions answered with the revoked version after
   the DELETE returned (goal 0), and the acknowledgement latency p50 / p99 under that load.
3. Cost of removal, on the embedded model and the example corpus (examples/batch1): train
   every shard, then delete one document and let the delete job retrain its shard. Wall time
   and training tokens of one shard against all, beside the paper's "up to 80x cheaper".

Writes benchmarks/results/deletion_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import ray
from _common import serve_on_loopback, write_result
from ray import serve

from actors.train_launcher import train_shards_with_ray
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_files, ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import load_config
from adapterswap.delete.job import request_delete, run_deletion
from adapterswap.models.embedder import load_embedder
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from support import publish_random_adapter  # noqa: E402  (tests' helper: real files, random LoRA)

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
    base = serve_on_loopback(config.home, overrides, replicas)
    round_trip, acknowledged = [], []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, timeout=120) as client:
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


IN_FLIGHT_TOKENS = 400  # a long generation on the tiny model (512 positions)


def in_flight(root: Path, deletes: int, replicas: int, load_clients: int) -> dict[str, Any]:
    """Delete documents whose adapters are generating, under a steady load (section 2)."""
    overrides = ["model.spec=tiny-random", f"model.cache_dir={root / 'models'}"]
    overrides += ["sharding.strategy=sequential", "ray.replica_num_cpus=0.2", "lora.rank=4"]
    overrides += ["lora.target_modules=[q_proj, v_proj]", "serve.revocation_timeout_s=30"]
    # The tiny model's answers are noise: always route, at full weight.
    overrides += ["router.min_score=-1", "router.full_score=-1"]
    config = load_config(home=str(root / "in_flight"), environ={}, overrides=overrides)
    docs = {f"doc-{i}": f"Fact number {i} is {i * 37 % 101}." for i in range(deletes)}
    docs["keep"] = "A fact nobody deletes."
    records = [
        RawRecord(doc, {"id": doc, "text": text, "group": "hr"}) for doc, text in docs.items()
    ]
    ingest_records(records, config, embed=None)
    registry = AdapterRegistry(config.db_path)
    embed = load_embedder(config.embedding).embed
    adapters = {
        doc: publish_random_adapter(
            config, registry, embed, f"hr.b0001.{i:03d}", "hr", [text], seed=i, doc_ids=[doc]
        ).id
        for i, (doc, text) in enumerate(docs.items())
    }
    keys = {
        "admin": registry.create_key("root", ["hr"], admin=True)[0],
        "hr": registry.create_key("hana", ["hr"])[0],
    }
    base = serve_on_loopback(config.home, overrides, replicas)
    headers = {k: {"Authorization": f"Bearer {v}"} for k, v in keys.items()}

    def long_body(doc: str, stream: bool) -> dict[str, Any]:
        return {
            "prompt": f"Tell me about {doc}.",
            "adapters": [{"id": adapters[doc], "weight": 1.0}],
            "max_tokens": IN_FLIGHT_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }

    stop = threading.Event()
    load_statuses: list[int] = []

    def steady_load() -> None:
        body = {**long_body("keep", False), "max_tokens": 16}
        with httpx.Client(base_url=base, timeout=120) as http:
            while not stop.is_set():
                load_statuses.append(
                    http.post("/v1/completions", json=body, headers=headers["hr"]).status_code
                )

    loaders = [threading.Thread(target=steady_load) for _ in range(load_clients)]
    for thread in loaders:
        thread.start()
    after_ack, endings, answered_revoked, acknowledged, round_trip = [], [], 0, [], []
    outcomes: list[str] = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for i in range(deletes):
            doc = f"doc-{i}"
            chunks: list[tuple[float, str]] = []
            completion: dict[str, Any] = {}

            def stream(doc: str = doc, chunks: list = chunks) -> None:
                with (
                    httpx.Client(base_url=base, timeout=120) as http,
                    http.stream(
                        "POST", "/v1/completions", json=long_body(doc, True), headers=headers["hr"]
                    ) as response,
                ):
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            chunks.append((time.monotonic(), line.removeprefix("data: ")))

            def complete(doc: str = doc, completion: dict = completion) -> None:
                # Routed (every hr adapter still active, this one among them): the revoked
                # version is dropped at the next step and the request routed again.
                body = {**long_body(doc, False), "top_k": 16}
                del body["adapters"]
                with httpx.Client(base_url=base, timeout=120) as http:
                    r = http.post("/v1/completions", json=body, headers=headers["hr"])
                    completion.update(status=r.status_code, body=r.json(), at=time.monotonic())

            workers = [threading.Thread(target=complete if i % 2 else stream)]
            for thread in workers:
                thread.start()
            if i % 2:
                time.sleep(0.3)  # under way: 400 tokens take seconds here
            deadline = time.monotonic() + 60
            while not i % 2 and len(chunks) < 5 and time.monotonic() < deadline:
                time.sleep(0.005)
            started = time.perf_counter()
            answer = client.delete(f"/v1/documents/{doc}", headers=headers["admin"])
            returned = time.monotonic()
            round_trip.append(time.perf_counter() - started)
            answer.raise_for_status()
            acknowledged.append(answer.json()["acknowledged_after_s"])
            for thread in workers:
                thread.join(timeout=120)
            if not i % 2:
                text = [(t, c) for t, c in chunks if c != "[DONE]" and "error" not in json.loads(c)]
                after_ack.append(sum(1 for t, c in text if t > returned))
                last = json.loads(chunks[-2][1]) if len(chunks) >= 2 else {}
                ended = "before" if chunks and chunks[-1][0] < returned else "after"
                code = last.get("error", {}).get("code")
                endings.append(code or f"ran to the end, {ended} the DELETE returned")
                continue
            named = completion.get("body", {}).get("adapterswap", {}).get("adapters", [])
            revoked_named = any(a["id"] == adapters[doc] for a in named)
            if completion.get("status") == 200 and revoked_named:
                before = completion["at"] < returned
                outcome = "200 revoked version, before the DELETE returned" if before else None
                answered_revoked += not before
            else:
                outcome = str(completion.get("status"))
            outcomes.append(outcome or "200 revoked version, after the DELETE returned")
    stop.set()
    for thread in loaders:
        thread.join(timeout=120)
    serve.delete("adapterswap")
    result = {
        "replicas": replicas,
        "deletes": deletes,
        "load_clients": load_clients,
        "load_requests": len(load_statuses),
        "load_errors": sum(1 for s in load_statuses if s != 200),
        "stream_tokens": IN_FLIGHT_TOKENS,
        "stream_chunks_after_delete_returned": {"total": sum(after_ack), "max": max(after_ack)},
        "stream_endings": {e: endings.count(e) for e in sorted(set(endings))},
        "completions_answered_with_revoked_version": answered_revoked,
        "completion_outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "acknowledged_after_s": {
            "p50": percentile(acknowledged, 50),
            "p99": percentile(acknowledged, 99),
        },
        "round_trip_s": {"p50": percentile(round_trip, 50), "p99": percentile(round_trip, 99)},
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
    everything = run_training(config, registry, train_shards=train_shards_with_ray)
    all_s = time.perf_counter() - started
    victim = sorted(Catalog(config.storage).ids())[0]
    started = time.perf_counter()
    request = request_delete(registry, Catalog(config.storage), [victim], "bench", "bench")
    report = run_deletion(
        config, registry, train_shards=train_shards_with_ray, job_id=request.job_id
    )
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
    parser.add_argument("--in-flight-deletes", type=int, default=12)
    parser.add_argument("--load-clients", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=["revocation", "in_flight", "removal"],
        help="run one part; keep the others' JSON",
    )
    args = parser.parse_args()
    previous = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            latency = previous.get("revocation")
            if args.only in (None, "revocation"):
                latency = revocation_latency(Path(tmp), args.deletes, args.replicas)
                serve.shutdown()
            flight = previous.get("in_flight")
            if args.only in (None, "in_flight"):
                flight = in_flight(
                    Path(tmp), args.in_flight_deletes, args.replicas, args.load_clients
                )
                serve.shutdown()
            removal = previous.get("removal")
            if args.only in (None, "removal"):
                removal = removal_cost(Path(tmp), args.steps)
        finally:
            ray.shutdown()
    write_result("deletion_cost", {"revocation": latency, "in_flight": flight, "removal": removal})
    if latency:
        print(
            f"revocation p50 {latency['acknowledged_after_s']['p50'] * 1000:.0f} ms, p99 "
            f"{latency['acknowledged_after_s']['p99'] * 1000:.0f} ms over {latency['deletes']} "
            f"deletes, {latency['replicas']} replicas"
        )
    if flight:
        print(
            f"in flight: {flight['stream_chunks_after_delete_returned']['total']} stream chunks "
            f"after the DELETE returned, {flight['completions_answered_with_revoked_version']} "
            f"completions answered with the revoked version, over {flight['deletes']} deletes; "
            f"acknowledgement under load p50 {flight['acknowledged_after_s']['p50'] * 1000:.0f} "
            f"ms, p99 {flight['acknowledged_after_s']['p99'] * 1000:.0f} ms"
        )
    if removal:
        print(
            f"removal: one shard {removal['wall_ratio']:.1f}x faster, "
            f"{removal['token_ratio']:.1f}x fewer tokens than all {removal['shards']} shards"
        )


if __name__ == "__main__":
    main()
