"""Serving thousands of adapters: throughput, latency, routing and memory against their count.

    python benchmarks/serve_scale.py [--sizes 10,100,1000,5000] [--requests 64] [--home DIR]

A synthetic population (``_population.py``: random LoRA weights of trained adapters' norms,
router statistics from synthetic chunks clustered per group and shard, real files, real
store records, never trained) over 50 groups grows in one home, 10 → 100 → 1,000 → 5,000
adapters, each size a superset of the one before. The adapters are rank 8 on ``q_proj`` and
``v_proj`` (1.8 MB each in fp32; the default rank 16 on all seven linear kinds is 19.5 MB,
and 5,000 of them would not fit this machine's disk), and the serving config says so.

For each size, a fresh local Ray serves the home (the embedded SmolLM2-135M, fp32, one model
replica, the configuration's defaults otherwise) on loopback, and:

1. **Cold adapters**: right after start, while a base-model stream decodes, a request for an
   adapter never loaded before, then the same request again (now loaded): the first one's
   extra time to first token against the adapter's load time (``StorageAdapterSource.load``
   timed in this process), and how much longer the running stream's longest step was while
   the cold request waited than while the warm one did (a stall).
2. **First routing**: one ``adapters: "auto"`` request per caller (the ingress reads every
   visible shard's statistics the first time).
3. **Warm-up** (``--warmup`` requests), then **saturation** (``--requests`` at once:
   completion tokens/s) and **open loop** (Poisson arrivals at ``--load`` times the smallest
   size's saturation requests/s: TTFT p50/p99 of the streamed half).

The requests: a caller holding 1, 5 or 50 groups (keys from the real key store), uniformly;
70 % name 1-3 adapters the caller may see, drawn by Zipf popularity (s = 1, a seeded rank
per adapter); 30 % are ``adapters: "auto"`` on the topic of a group drawn the same way, so
the router runs; half are streamed; greedy, ``max_tokens`` 16, short prompts.

Router latency and hit rates come from the replicas' metrics (``adapterswap_router_scoring_ms``:
scoring the visible shards and choosing, at the ingress, which the goal is about, and
``adapterswap_router_latency_ms``, the same with the query's embedding; the histograms'
buckets bound their quantiles, and the 5 ms bucket checks the goal exactly; the adapter tiers' hit and
miss counters), host memory from the model and ingress replicas' resident set sizes and the
tiers' byte gauges. Writes results/serve_scale.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import ray
from _common import RESULTS, serve_on_loopback, write_result
from _plots import panel_lines
from _population import PopulationSpec, adapter_of, group_name, grow_population, topic_texts
from _prometheus import condense, delta, histogram, quantile, scrape, share_at_most, total
from _scale_traffic import (
    Caller,
    Popularity,
    body,
    caller_groups,
    create_keys,
    drive,
    traffic,
    zipf_weights,
)
from ray import serve
from serve_throughput import overrides
from serve_traffic import Outcome, Request, percentiles, send, summarise, words

from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.models.base import hash_base_model
from adapterswap.models.embedder import load_embedder
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry
from adapterswap.types import AdapterRef, Embed

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from support import metrics_export  # noqa: E402  (Ray's metrics on a free port, every 0.5 s)

SCALE_SETTINGS = ["lora.rank=8", "lora.alpha=16", 'lora.target_modules=["q_proj","v_proj"]']
ROUTER = "ray_adapterswap_router_latency_ms"
SCORING = "ray_adapterswap_router_scoring_ms"
ROUTER_GOAL_MS = 5.0
EXPORT_S = 3.0  # the replicas' metrics reach the export within this (0.5 s reports)


# -- the replicas' metrics and memory ---------------------------------------------------------


def hit_rates(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each adapter tier's lookups answered, missed, and the rate (``bank``, ``host``): from
    the tiers' counters, or where a replica has none, its one adapter cache's."""
    out = {}
    for tier in ("bank", "host"):
        hits = counters.get(f"{tier} adapter_tier_hits_total")
        misses = counters.get(f"{tier} adapter_tier_misses_total")
        if hits is not None or misses is not None:
            out[tier] = {"hits": hits or 0.0, "misses": misses or 0.0}
    if not out:
        hits = counters.get("adapter_cache_hits_total", 0.0)
        out["bank"] = {"hits": hits, "misses": counters.get("adapter_cache_misses_total", 0.0)}
    for counts in out.values():
        counts["hit_rate"] = counts["hits"] / max(counts["hits"] + counts["misses"], 1.0)
    return out


def replica_rss() -> dict[str, int]:
    """Resident bytes of this run's Serve replicas (processes of the Ray it started, not of
    another run on the machine), by deployment (Model, Ingress)."""
    out: dict[str, int] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            title, rss = " ".join(process.cmdline()), process.memory_info().rss
        except psutil.Error:  # it ended since the listing
            continue
        match = re.search(r"ServeReplica:adapterswap:(\w+?)(?:\.|\s|$)", title)
        if match:
            out[match[1]] = out.get(match[1], 0) + rss
    return out


def cache_budget(config: AdapterSwapConfig) -> int:
    """The bytes the configuration lets a model replica's adapter caches take (every
    ``serve.*cache_bytes``: the bank's slots, and a host cache where there is one)."""
    serve_settings = config.serve.model_dump()
    return sum(v for name, v in serve_settings.items() if name.endswith("cache_bytes"))


# -- one size ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """What every size shares."""

    config: AdapterSwapConfig
    settings: list[str]  # the serving overrides
    callers: list[Caller]
    topics: dict[str, str]  # group -> its topic text
    source: StorageAdapterSource  # the real loader, timed in this process
    args: argparse.Namespace


async def cold_probe_async(url: str, key: str, adapter_id: str, prompt: str) -> dict[str, float]:
    """While a base-model stream decodes: a request for ``adapter_id`` (never loaded), then
    the same again (loaded). Their TTFTs, the stream's median step, and how much longer its
    longest step was while the cold request waited for its first token than while the warm
    one did (both add a prefill to a step; only the cold one a load)."""
    mixture = [{"id": adapter_id, "weight": 1.0}]
    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        running = asyncio.create_task(
            send(http, url, key, Request(0.0, body(prompt, "none", True, 96)), t0)
        )
        await asyncio.sleep(1.0)  # past its prefill: it decodes a token per step
        probes = []
        for _ in range(2):  # cold, then warm
            request = Request(time.perf_counter() - t0, body(prompt, mixture, True, 4))
            probes.append(await send(http, url, key, request, t0))
        background = await running
    cold, warm = probes
    steps = list(zip(background.chunks, background.chunks[1:], strict=False))
    step = statistics.median(b - a for a, b in steps) if steps else math.nan
    return {
        "ttft_cold_s": first_token(cold) - cold.sent,
        "ttft_warm_s": first_token(warm) - warm.sent,
        "step_s": step,
        "stall_s": longest_step(steps, cold) - longest_step(steps, warm),
    }


def first_token(outcome: Outcome) -> float:
    return outcome.chunks[0] if outcome.chunks else math.nan


def longest_step(steps: list[tuple[float, float]], waiting: Outcome) -> float:
    """The longest of ``steps`` (a stream's chunk to chunk) that overlaps ``waiting``'s wait
    for its first token."""
    during = [b - a for a, b in steps if b > waiting.sent and a < first_token(waiting)]
    return max(during, default=math.nan)


def embedding_ms(embed: Embed, texts: list[str]) -> dict[str, float]:
    """The query embedding alone, timed in this process before serving starts: the part of
    the router metric that does not depend on the adapter count."""
    embed(texts[:1])  # its first call sets up
    times = []
    for text in texts:
        start = time.perf_counter()
        embed([text])
        times.append(1000 * (time.perf_counter() - start))
    return percentiles(times)


def load_seconds(source: StorageAdapterSource, ref: AdapterRef, repeats: int = 3) -> float:
    """The median time the real loader takes to read, check and parse ``ref``'s files."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        source.load(ref)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cold_adapters(url: str, bench: Bench, refs: list[AdapterRef]) -> dict[str, Any]:
    """``--probes`` cold probes (before any request has loaded an adapter), against each
    adapter's load time; the medians over the probes."""
    everyone = bench.callers[-1]
    rng = random.Random(len(refs))
    probes = []
    for i in rng.sample(range(len(refs)), min(bench.args.probes, len(refs))):
        prompt = bench.topics[adapter_of(i)[1]]
        probe = asyncio.run(
            cold_probe_async(f"{url}/v1/completions", everyone.key, refs[i].id, prompt)
        )
        probes.append(
            {"adapter": refs[i].id, **probe, "load_s": load_seconds(bench.source, refs[i])}
        )
    median = {
        name: statistics.median(p[name] for p in probes)
        for name in ("ttft_cold_s", "ttft_warm_s", "step_s", "stall_s", "load_s")
    }
    median["extra_ttft_s"] = statistics.median(p["ttft_cold_s"] - p["ttft_warm_s"] for p in probes)
    return {"probes": probes, "median": median}


def first_routing(url: str, bench: Bench) -> dict[str, float]:
    """Seconds of each kind of caller's first ``auto`` request (one token, end to end)."""
    out = {}
    for caller in {c.kind: c for c in bench.callers}.values():
        prompt = bench.topics[caller.groups[0]]
        first = Request(0.0, body(prompt, "auto", False, max_tokens=1))
        (outcome,) = drive(url, [(caller.key, first)])
        out[caller.kind] = outcome.done - outcome.sent
    return out


def measure_size(
    url: str, metrics_url: str, bench: Bench, refs: list[AdapterRef], rate: float | None
) -> dict[str, Any]:
    """Every measurement of one size on a freshly started server (see the module)."""
    n = bench.args.requests
    popularity = Popularity([adapter_of(i) for i in range(len(refs))], zipf_weights(len(refs)))
    mix = (bench.callers, popularity, bench.topics)
    base = Request(0.0, body(bench.topics[group_name(0)], "none", False))
    drive(url, [(bench.callers[-1].key, base)] * 2)  # the model's first forwards
    rss_idle = replica_rss()
    cold = cold_adapters(url, bench, refs)
    time.sleep(EXPORT_S)
    before_first = scrape(metrics_url)
    first = first_routing(url, bench)
    warm_up = traffic(bench.args.warmup, math.inf, 99, *mix)
    for i in range(0, len(warm_up), n):  # in bursts the queue takes
        drive(url, warm_up[i : i + n])
    time.sleep(EXPORT_S)
    start = scrape(metrics_url)
    burst_requests = traffic(n, math.inf, 0, *mix)
    burst = summarise(drive(url, burst_requests), math.inf)
    rate = rate or bench.args.load * burst["requests_per_s"]
    open_requests = traffic(n, rate, 1, *mix)
    open_loop = summarise(drive(url, open_requests), rate)
    time.sleep(EXPORT_S)
    end = scrape(metrics_url)
    auto = sum(r.body["adapters"] == "auto" for _, r in burst_requests + open_requests)
    first_counted = delta(before_first, start)
    first_ms = total(first_counted, f"{ROUTER}_sum") / max(
        total(first_counted, f"{ROUTER}_count"), 1
    )
    return {
        "adapters": len(refs),
        "saturation": burst,
        "open_loop": open_loop,
        "router_ms": {
            **router_latency(delta(start, end), ROUTER),
            "auto_requests_sent": auto,
            "first_requests_mean": first_ms,
        },
        "scoring_ms": router_latency(delta(start, end), SCORING),
        "first_routing_e2e_s": first,
        **replica_counts(delta(start, end), end),
        "rss_bytes": {"idle": rss_idle, "end": replica_rss()},
        "cold": cold,
    }


def router_latency(counted: dict[str, float], metric: str) -> dict[str, float]:
    """A router histogram's p50, p99, share within the goal and count, over a window."""
    buckets = histogram(counted, metric)
    return {
        "p50": quantile(buckets, 0.5),
        "p99": quantile(buckets, 0.99),
        "share_within_goal": share_at_most(buckets, ROUTER_GOAL_MS),
        "n": buckets[-1][1] if buckets else 0,
    }


def replica_counts(counted: dict[str, float], end: dict[str, float]) -> dict[str, Any]:
    """The counters over a window (summed by meaning), the tiers' hit rates from them, and
    the gauges of bytes held at its end."""
    counters = condense({s: v for s, v in counted.items() if s.split("{")[0].endswith("_total")})
    return {
        "hit_rates": hit_rates(counters),
        "counters": counters,
        "byte_gauges": condense({s: v for s, v in end.items() if re.match(r"\w*bytes\{", s)}),
    }


def run_size(bench: Bench, refs: list[AdapterRef], rate: float | None) -> dict[str, Any]:
    """One size on a local Ray of its own (2 CPUs), started and shut down here."""
    options, metrics_url = metrics_export()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, **options)
    try:
        url = serve_on_loopback(bench.config.home, bench.settings, 1)
        return measure_size(url, metrics_url, bench, refs, rate)
    finally:
        serve.shutdown()
        ray.shutdown()


# -- goals, report, plot ----------------------------------------------------------------------


def goals(points: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """The issue's goals on the sizes measured: throughput at 1,000 (or the largest size)
    against the smallest, router p99 at the largest, memory, cold adapters at every size."""
    by_size = {p["adapters"]: p for p in points}
    smallest, largest = min(by_size), max(by_size)
    at = 1000 if 1000 in by_size else largest
    tokens = {n: p["saturation"]["completion_tokens_per_s"] for n, p in by_size.items()}
    ratio = tokens[at] / tokens[smallest]
    within = by_size[largest]["scoring_ms"]["share_within_goal"]
    first = by_size[smallest]["rss_bytes"]["end"].get("Model", 0)  # the same work, fewer adapters
    peak = max(p["rss_bytes"]["end"].get("Model", 0) for p in points)
    cold = {
        n: p["cold"]["median"]["extra_ttft_s"]
        <= p["cold"]["median"]["load_s"] + p["cold"]["median"]["step_s"]
        for n, p in by_size.items()
    }
    return {
        "throughput_ratio": {"adapters": at, "against": smallest, "ratio": ratio},
        "router_share_within_5ms": {"adapters": largest, "share": within},
        "model_replica_rss_growth_bytes": peak - first,
        "cache_budget_bytes": budget,
        "met": {
            f"tokens/s at {at} >= 0.95x at {smallest}": ratio >= 0.95,
            f"router p99 < {ROUTER_GOAL_MS:g} ms at {largest}": within >= 0.99,
            "model replica memory within its configured caches": peak - first <= budget,
            "cold request pays at most its load (+1 step) in TTFT": all(cold.values()),
        },
    }


def describe(p: dict[str, Any]) -> str:
    r, o, c = p["scoring_ms"], p["open_loop"], p["cold"]["median"]
    rss = p["rss_bytes"]["end"]
    return (
        f"{p['adapters']:5d} adapters: {p['saturation']['completion_tokens_per_s']:.1f} tok/s, "
        f"TTFT p50/p99 {o['ttft_s']['p50']:.2f}/{o['ttft_s']['p99']:.2f} s, "
        f"router scoring p50/p99 {r['p50']:.2f}/{r['p99']:.2f} ms ({r['share_within_goal']:.0%} "
        f"<= {ROUTER_GOAL_MS:g} ms; with the embedding p50/p99 {p['router_ms']['p50']:.1f}/"
        f"{p['router_ms']['p99']:.1f} ms), "
        f"bank hits {p['hit_rates']['bank']['hit_rate']:.0%}, "
        f"RSS model {rss.get('Model', 0) / 2**20:.0f} MiB ingress "
        f"{rss.get('Ingress', 0) / 2**20:.0f} MiB, cold +{1000 * c['extra_ttft_s']:.0f} ms "
        f"TTFT against a {1000 * c['load_s']:.1f} ms load (step {1000 * c['step_s']:.0f} ms, "
        f"stall {1000 * c['stall_s']:.0f} ms), {p['saturation']['errors']} errors"
    )


def plot(path: Path, points: list[dict[str, Any]]) -> None:
    def line(f) -> list[tuple[float, float]]:
        return [(p["adapters"], f(p)) for p in points]

    mib = 2**20
    panels = {
        "completion tokens/s (saturation)": {
            "saturation tokens/s": line(lambda p: p["saturation"]["completion_tokens_per_s"])
        },
        "TTFT, open loop (s)": {
            f"TTFT {q}": line(lambda p, q=q: p["open_loop"]["ttft_s"][q]) for q in ("p50", "p99")
        },
        "router latency (ms)": {
            f"{name} {q}": line(lambda p, q=q, k=key: p[k][q])
            for name, key in (("scoring", "scoring_ms"), ("with embedding", "router_ms"))
            for q in ("p50", "p99")
        },
        "hit rate": {
            f"{tier} tier": line(
                lambda p, t=tier: p["hit_rates"].get(t, {}).get("hit_rate", math.nan)
            )
            for tier in dict.fromkeys(t for p in points for t in p["hit_rates"])
        },
        "host memory (MiB)": {
            **{
                name: line(lambda p, d=d: p["rss_bytes"]["end"].get(d, 0) / mib)
                for name, d in (("model replica RSS", "Model"), ("ingress RSS", "Ingress"))
            },
            **{  # the replica's own gauges of bytes held, where it has any
                gauge: line(lambda p, g=gauge: p["byte_gauges"].get(g, math.nan) / mib)
                for gauge in dict.fromkeys(g for p in points for g in p["byte_gauges"])
            },
        },
        "cold adapter (ms)": {
            "extra TTFT": line(lambda p: 1000 * p["cold"]["median"]["extra_ttft_s"]),
            "load time": line(lambda p: 1000 * p["cold"]["median"]["load_s"]),
        },
    }
    panel_lines(
        path, title="serving against the adapter count", panels=panels, xlabel="adapters", xlog=True
    )


def bench_settings(args: argparse.Namespace) -> list[str]:
    return [*overrides(args.model_cache), *SCALE_SETTINGS, *args.set]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,5000")
    parser.add_argument("--requests", type=int, default=64, help="per phase (at most 72)")
    parser.add_argument("--warmup", type=int, help="requests before measuring (default --requests)")
    parser.add_argument("--load", type=float, default=0.7, help="open loop, of the capacity")
    parser.add_argument("--probes", type=int, default=3, help="cold adapters per size")
    parser.add_argument("--home", type=Path, help="grow the population here (kept); default temp")
    parser.add_argument("--set", action="append", default=[], help="S.F=V over the settings")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    args.warmup = args.requests if args.warmup is None else args.warmup
    args.model_cache = Path("~/.adapterswap/models").expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.home or Path(tmp) / "home")


def run(args: argparse.Namespace, home: Path) -> None:
    settings = bench_settings(args)
    config = load_config(home=str(home), environ={}, overrides=settings)
    registry = AdapterRegistry(config.db_path)
    embedder = load_embedder(config.embedding)
    topics = topic_texts(words())
    spec = PopulationSpec.build(config, embedder.embed, embedder.model_id, topics)
    source = StorageAdapterSource(
        StorageLayout.from_config(config), hash_base_model(config.model, config.model_cache_dir)
    )
    callers = create_keys(registry, caller_groups(spec.groups))
    named = {group_name(g): t for g, t in enumerate(topics)}
    embedding = embedding_ms(embedder.embed, topics)
    bench = Bench(config, settings, callers, named, source, args)
    points, rate = [], None
    for size in args.sizes:
        started = time.perf_counter()
        refs = grow_population(spec, registry, size)
        built = time.perf_counter() - started
        started = time.perf_counter()
        point = run_size(bench, refs, rate)
        point |= {"build_s": built, "measure_s": time.perf_counter() - started}
        rate = rate or point["open_loop"]["offered_requests_per_s"]
        print(describe(point), flush=True)
        points.append(point)
    met = goals(points, cache_budget(config))
    print("goals:", met["met"])
    payload = {
        "sizes": args.sizes,
        "requests": args.requests,
        "load": args.load,
        "settings": settings,
        "query_embedding_ms": embedding,
        "disk_bytes_per_adapter": adapter_bytes(config, refs[0]),
        "points": points,
        "goals": met,
    }
    write_result("serve_scale", payload, args.out)
    plot(args.out / "serve_scale.png", points)


def adapter_bytes(config: AdapterSwapConfig, ref: AdapterRef) -> int:
    """What one adapter version takes in storage (all its files)."""
    path = Path(StorageLayout.from_config(config).version(ref).path)
    return sum(f.stat().st_size for f in path.iterdir())


if __name__ == "__main__":
    main()
