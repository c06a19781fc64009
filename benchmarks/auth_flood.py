"""Does a flood of bad API keys slow down a deletion's acknowledgement?

    python benchmarks/auth_flood.py [--deletes 40] [--rate 200] [--blocks 4]

The one AdapterStore actor answers key lookups, epoch reads and the replicas'
acknowledgements of a revocation. A caller without a key could once slow every DELETE by
sending bad keys, each one a store call. Now a malformed key is refused in the ingress, an
unknown one is cached negatively for ``serve.negative_key_cache_ttl_s``, and the ingress
sends at most ``auth.LOOKUP_THREADS`` lookups to the store at once.

A Serve app on the tiny random model (the barrier does not depend on the model) serves
``3 x --deletes`` documents, each in a shard of its own with an active adapter version whose
lineage is that document (registered in the store, no weights: the barrier never loads
them). So every DELETE revokes a version and waits for the model replica to acknowledge
the new epoch, and the delete job behind it has nothing left to train.

DELETEs run one after another in ``--blocks`` rounds of three stretches (so drift hits all
alike): quiet; under ``--rate`` requests/s of ``GET /healthz`` (the same HTTP load without
authentication: what any traffic costs two shared cores); under ``--rate`` requests/s of
``GET /v1/models`` with bad keys: half malformed, a quarter fresh random well-formed keys
(each a store lookup: the worst case), a quarter drawn from 8 repeated unknown keys
(answered from the negative cache). Reported per condition: DELETE round trip and the
server's acknowledgement wait (``acknowledged_after_s``), p50 and p99, and the ratios of the
flooded conditions to quiet and of the bad-key flood to the healthz one.

Writes benchmarks/results/auth_flood.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2 as httpx
import ray
from _common import serve_on_loopback, write_result
from deletion_cost import percentile
from ray import serve

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import load_config
from adapterswap.store.registry import AdapterRegistry


def bad_key(i: int, repeated: list[str]) -> str:
    """Half malformed, a quarter fresh well-formed, a quarter repeated well-formed."""
    if i % 2 == 0:
        return secrets.choice(["nonsense", "as_bad_key", "as_" + "z" * 81, secrets.token_hex(40)])
    if i % 4 == 1:
        return f"as_{secrets.token_hex(8)}_{secrets.token_hex(32)}"
    return repeated[i % len(repeated)]


class Flood:
    """``rate`` requests/s from a thread of its own while on: bad keys or health checks."""

    def __init__(self, base_url: str, rate: float) -> None:
        self.base_url, self.rate = base_url, rate
        self.statuses: dict[str, Counter[str]] = {"healthz": Counter(), "bad_keys": Counter()}
        self.sent: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.mode = "bad_keys"
        self._on = threading.Event()
        self._quit = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        repeated = [f"as_{secrets.token_hex(8)}_{secrets.token_hex(32)}" for _ in range(8)]
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30, limits=limits) as client:
            tasks: set[asyncio.Task[None]] = set()
            while not self._quit:
                if not self._on.is_set():
                    await asyncio.sleep(0.01)
                    continue
                mode, started, i = self.mode, time.perf_counter(), 0
                while self._on.is_set() and not self._quit:
                    # Open loop: request i goes out at i / rate, whatever the answers' pace.
                    delay = started + i / self.rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    key = bad_key(self.sent[mode], repeated) if mode == "bad_keys" else None
                    task = asyncio.create_task(self._one(client, mode, key))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    self.sent[mode], i = self.sent[mode] + 1, i + 1
                self.seconds[mode] += time.perf_counter() - started
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, client: httpx.AsyncClient, mode: str, key: str | None) -> None:
        try:
            if key is None:
                answer = await client.get("/healthz")
            else:
                answer = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            self.statuses[mode][str(answer.status_code)] += 1
        except httpx.HTTPError as exc:
            self.statuses[mode][type(exc).__name__] += 1

    def on(self, mode: str) -> None:
        self.mode = mode
        self._on.set()

    def off(self) -> None:
        self._on.clear()

    def stop(self) -> None:
        self._quit = True
        self._on.clear()
        self._thread.join(60)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}


CONDITIONS = ("quiet", "healthz", "bad_keys")


def serve_home(root: Path, docs: int, replicas: int) -> tuple[str, str, Any]:
    """A served home of ``docs`` one-document shards, each with an active version; returns
    (base URL, admin key, config)."""
    overrides = ["model.spec=tiny-random", f"model.cache_dir={root / 'models'}"]
    overrides += ["sharding.strategy=sequential", "sharding.max_shard_docs=1"]
    overrides += ["ray.replica_num_cpus=0.2"]
    config = load_config(home=str(root / "home"), environ={}, overrides=overrides)
    records = [
        RawRecord(f"d{i}", {"id": f"doc-{i}", "text": f"Fact number {i}.", "group": "hr"})
        for i in range(docs)
    ]
    ingest_records(records, config, embed=None)
    registry = AdapterRegistry(config.db_path)
    for row in Catalog(config.storage).read(["id", "shard"]).to_pylist():
        version = registry.register_version(row["shard"], "hr", "unused", [row["id"]]).version
        registry.activate(row["shard"], version)
    admin = registry.create_key("root", ["hr"], admin=True)[0]
    base = serve_on_loopback(config.home, overrides, replicas)
    return base, admin, config


def measure(root: Path, deletes: int, rate: float, blocks: int, replicas: int) -> dict[str, Any]:
    base_url, admin, config = serve_home(root, len(CONDITIONS) * deletes, replicas)
    flood = Flood(base_url, rate)
    runs = {name: {"round_trip_s": [], "acknowledged_after_s": []} for name in CONDITIONS}
    per_stretch = max(1, deletes // blocks)
    headers = {"Authorization": f"Bearer {admin}"}
    doc = 0
    try:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            client.delete("/v1/documents/warm-up", headers=headers)  # first call: imports, caches
            for block in range(len(CONDITIONS) * blocks):
                name = CONDITIONS[block % len(CONDITIONS)]
                if name != "quiet":
                    flood.on(name)
                    time.sleep(1.0)  # let the flood reach its rate before measuring
                for _ in range(per_stretch):
                    started = time.perf_counter()
                    answer = client.delete(f"/v1/documents/doc-{doc}", headers=headers)
                    runs[name]["round_trip_s"].append(time.perf_counter() - started)
                    answer.raise_for_status()
                    assert answer.json()["revoked"], answer.text  # the barrier had work to do
                    runs[name]["acknowledged_after_s"].append(answer.json()["acknowledged_after_s"])
                    doc += 1
                flood.off()
                time.sleep(0.5)  # the flood's stragglers drain before the next stretch
    finally:
        flood.stop()
        serve.delete("adapterswap")
    result: dict[str, Any] = {
        "replicas": replicas,
        "deletes_per_condition": per_stretch * blocks,
        "blocks": blocks,
        "epoch_poll_s": config.serve.epoch_poll_s,
        "negative_key_cache_ttl_s": config.serve.negative_key_cache_ttl_s,
        "flood": {
            mode: {
                "target_rate_per_s": rate,
                "achieved_rate_per_s": round(flood.sent[mode] / max(flood.seconds[mode], 1e-9), 1),
                "sent": flood.sent[mode],
                "statuses": dict(flood.statuses[mode]),
            }
            for mode in CONDITIONS[1:]
        },
        "bad_key_mix": "1/2 malformed, 1/4 fresh well-formed, 1/4 from 8 repeated well-formed",
    }
    for metric in ("round_trip_s", "acknowledged_after_s"):
        stats = {name: summary(runs[name][metric]) for name in CONDITIONS}
        result[metric] = {
            **stats,
            "ratio_to_quiet": {
                name: {q: stats[name][q] / stats["quiet"][q] for q in ("p50", "p99")}
                for name in CONDITIONS[1:]
            },
            "bad_keys_over_healthz": {
                q: stats["bad_keys"][q] / stats["healthz"][q] for q in ("p50", "p99")
            },
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deletes", type=int, default=60, help="DELETEs per condition")
    parser.add_argument("--rate", type=float, default=200.0, help="bad-key requests per second")
    parser.add_argument("--blocks", type=int, default=4, help="quiet/flood alternations")
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            result = measure(Path(tmp), args.deletes, args.rate, args.blocks, args.replicas)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(json.dumps(result, indent=2))
    write_result("auth_flood", result)
    for metric in ("acknowledged_after_s", "round_trip_s"):
        row = result[metric]
        print(
            f"{metric}: p50/p99 ms quiet {row['quiet']['p50'] * 1e3:.0f}/"
            f"{row['quiet']['p99'] * 1e3:.0f}, healthz flood {row['healthz']['p50'] * 1e3:.0f}/"
            f"{row['healthz']['p99'] * 1e3:.0f}, bad-key flood {row['bad_keys']['p50'] * 1e3:.0f}/"
            f"{row['bad_keys']['p99'] * 1e3:.0f}; bad keys vs quiet "
            f"{row['ratio_to_quiet']['bad_keys']['p50']:.2f}x/"
            f"{row['ratio_to_quiet']['bad_keys']['p99']:.2f}x, vs healthz "
            f"{row['bad_keys_over_healthz']['p50']:.2f}x/{row['bad_keys_over_healthz']['p99']:.2f}x"
        )


if __name__ == "__main__":
    main()
