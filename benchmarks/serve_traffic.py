"""Serving under open-loop traffic: the continuous-batching engine against the loop it replaced.

    python benchmarks/serve_traffic.py --baseline DIR [--requests 40] [--loads 0.5,0.7,1,1.5,2.5]
    python benchmarks/serve_traffic.py --again mixtures,disconnects

``DIR`` is a checkout of the commit before the engine (``git worktree add DIR 617e812``): its
model replicas batch with ``@serve.batch`` and stream one request at a time. Both servers serve
the same home (serve_throughput's: 8 published rank-16 adapters on the embedded model), each
from its own tree in a subprocess (``_serve_tree.py``), one at a time, one model replica on a
local Ray over all cores, their default settings (8 rows).

The traffic (the same requests, seeded, for both) is an open-loop Poisson process: requests
arrive at exponential gaps whatever the server does. Each is greedy with ``ignore_eos``; its
prompt is 6 to 240 words of Python's standard-library documentation (log-uniform, about 8 to
330 tokens); ``max_tokens`` is uniform in 8..128; half are streamed (with
``stream_options.include_usage``); the caller is base-only (``adapters: "none"``) or one of 8
distinct 3-adapter mixtures, uniformly.

1. **Capacity**: ``requests`` arrivals at once, the queue never empty until the end:
   completion tokens/s at saturation, and the baseline's requests/s, which sets the loads.
2. **Latency against load**: at each fraction of the baseline's capacity (the baseline only up
   to ``BASELINE_MAX_LOAD``, past which its queue only grows): TTFT and inter-token latency
   (streams), end-to-end latency (all), p50 / p99, and completion tokens/s.
3. **Mixtures**: the engine at saturation with base-only callers, then with the 8 mixtures.
4. **Disconnects**: streams of 128 tokens whose clients close after the first token; the
   server's sampled-token counter (``adapterswap_generated_tokens``) minus what the clients
   received is what was decoded after the disconnects, per stream the steps its row outlived
   its client.

Writes results/serve_traffic.{json,png}. ``--again`` runs phases 3 and 4 again (the engine
only) into the written results.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from _common import RESULTS, free_port, write_result
from _plots import panel_lines
from serve_throughput import mixture, overrides, setup_home

HERE = Path(__file__).parent
BASELINE_MAX_LOAD = 1.5
DISCONNECTS = 8
ENGINE_ONLY = ("mixtures", "disconnects")
EXPORT_S = 12.0  # Ray exports metrics every few seconds
HEAD = ("benchmark", "machine", "date")  # what write_result adds
MODULES = ("argparse", "json", "logging", "pathlib", "subprocess", "threading", "asyncio")


@dataclass(frozen=True)
class Request:
    at: float  # seconds after the start of the run
    body: dict[str, Any]


@dataclass
class Outcome:
    stream: bool
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    tokens: int = 0
    chunks: list[float] = field(default_factory=list)  # arrival time of each text chunk


def words() -> list[str]:
    text = " ".join(inspect.getdoc(__import__(m)) or "" for m in MODULES)
    return re.sub(r"\s+", " ", text).split(" ")


def traffic(n: int, rate: float, seed: int, callers: str = "mixed") -> list[Request]:
    """``n`` requests arriving at ``rate`` per second (``math.inf``: all at once)."""
    rng, pool, at, out = random.Random(seed), words(), 0.0, []
    for _ in range(n):
        at += 0.0 if math.isinf(rate) else rng.expovariate(rate)
        length = round(math.exp(rng.uniform(math.log(6), math.log(240))))
        start = rng.randrange(len(pool) - length)
        caller, which = rng.randrange(9), rng.randrange(8)  # drawn whatever ``callers`` is:
        caller = caller if callers == "mixed" else int(callers == "mixtures")  # same requests
        stream = rng.random() < 0.5
        body = {
            "prompt": " ".join(pool[start : start + length]),
            "max_tokens": rng.randint(8, 128),
            "temperature": 0,
            "ignore_eos": True,
            "adapters": "none" if caller == 0 else mixture(which),
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }
        out.append(Request(at, body))
    return out


async def send(
    http: httpx.AsyncClient,
    url: str,
    key: str,
    request: Request,
    t0: float,
    close_after: int | None = None,
) -> Outcome:
    """One request at its arrival time; ``close_after`` chunks: the client hangs up then."""
    await asyncio.sleep(max(0.0, t0 + request.at - time.perf_counter()))
    outcome = Outcome(stream=request.body["stream"], sent=time.perf_counter())
    headers = {"Authorization": f"Bearer {key}"}
    if not outcome.stream:
        response = await http.post(url, json=request.body, headers=headers)
        outcome.status, outcome.done = response.status_code, time.perf_counter()
        if response.status_code == 200:
            outcome.tokens = response.json()["usage"]["completion_tokens"]
        return outcome
    async with http.stream("POST", url, json=request.body, headers=headers) as response:
        outcome.status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                outcome.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                outcome.chunks.append(time.perf_counter())
                if close_after is not None and len(outcome.chunks) >= close_after:
                    outcome.tokens = len(outcome.chunks)  # no more than this reached us
                    break
    outcome.done = time.perf_counter()
    return outcome


async def drive_async(url: str, key: str, requests: list[Request], close_after: int | None):
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        return await asyncio.gather(*(send(http, url, key, r, t0, close_after) for r in requests))


def drive(
    url: str, key: str, requests: list[Request], close_after: int | None = None
) -> list[Outcome]:
    return asyncio.run(drive_async(f"{url}/v1/completions", key, requests, close_after))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan, "n": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "n": len(values)}


def summarise(outcomes: list[Outcome], offered: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    span = max(o.done for o in ok) - min(o.sent for o in outcomes) if ok else math.nan
    streams = [o for o in ok if o.stream and o.chunks]
    return {
        "offered_requests_per_s": offered,
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "seconds": span,
        "requests_per_s": len(ok) / span,
        "completion_tokens_per_s": sum(o.tokens for o in ok) / span,
        "ttft_s": percentiles([o.chunks[0] - o.sent for o in streams]),
        "itl_s": percentiles([b - a for o in streams for a, b in itertools.pairwise(o.chunks)]),
        "e2e_s": percentiles([o.done - o.sent for o in ok]),
    }


@contextmanager
def server(tree: Path, home: str, settings: list[str]) -> Iterator[tuple[str, str]]:
    """``tree``'s AdapterSwap serving ``home`` in a subprocess: (base URL, metrics URL)."""
    port, metrics = free_port(), free_port()
    sets = [a for s in settings for a in ("--set", s)]
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_serve_tree.py"), home, str(port), str(metrics), *sets],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    try:
        line = process.stdout.readline()
        if not line.startswith("ready "):
            raise SystemExit(f"error: the server from {tree} did not start (see its output)")
        print(f"serving from {line.split(' ', 1)[1].strip()}", flush=True)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics"
    finally:
        process.stdin.close()
        process.wait(timeout=120)


def counter(metrics_url: str, name: str) -> float:
    text = httpx.get(metrics_url, timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def disconnects(url: str, metrics_url: str, key: str) -> dict[str, Any]:
    """Streams hung up after their first token: tokens the server decoded after that."""
    name = "ray_adapterswap_generated_tokens_total"
    body = {**traffic(1, math.inf, 0, "mixed")[0].body, "max_tokens": 128, "stream": True}
    time.sleep(EXPORT_S)  # the counter as of the last completion
    before = counter(metrics_url, name)
    outcomes = drive(url, key, [Request(0.0, body)] * DISCONNECTS, close_after=1)
    time.sleep(2.0)  # every cancelled row has left by now
    drive(url, key, traffic(1, math.inf, 1, "base"))  # a completion refreshes the counters
    time.sleep(EXPORT_S)
    sampled = counter(metrics_url, name) - before
    received = sum(o.tokens for o in outcomes)
    last = traffic(1, math.inf, 1, "base")[0].body["max_tokens"]
    after = sampled - received - last
    return {
        "streams": DISCONNECTS,
        "tokens_received": received,
        "tokens_sampled": sampled,
        "tokens_after_disconnect_per_stream": after / DISCONNECTS,
    }


def run_engine(name: str, tree: Path, home: str, key: str, args, capacity: float | None):
    results: dict[str, Any] = {"tree": str(tree)}
    with server(tree, home, overrides(args.model_cache)) as (url, metrics_url):
        drive(url, key, traffic(8, math.inf, 99))  # warm-up: every adapter loaded once
        burst = summarise(drive(url, key, traffic(args.requests, math.inf, 0)), math.inf)
        print(f"{name} saturation: {fmt(burst)}", flush=True)
        results["saturation"] = burst
        capacity = capacity or burst["requests_per_s"]
        results["curve"] = {}
        for load in args.loads:
            if name == "batch" and load > BASELINE_MAX_LOAD:
                continue
            rate = load * capacity
            point = summarise(drive(url, key, traffic(args.requests, rate, 1)), rate)
            print(f"{name} at {load:g}x ({rate:.3f} req/s): {fmt(point)}", flush=True)
            results["curve"][str(load)] = point
        if name == "engine":
            results |= engine_only(url, metrics_url, key, args.requests, ENGINE_ONLY)
    return results, capacity


def engine_only(
    url: str, metrics_url: str, key: str, requests: int, phases: tuple[str, ...]
) -> dict[str, Any]:
    """The phases run on the engine alone: base-only against mixtures-only traffic at
    saturation (the same requests but their adapters), and the disconnects."""
    results: dict[str, Any] = {}
    if "mixtures" in phases:
        for callers in ("base", "mixtures"):
            one = summarise(drive(url, key, traffic(requests, math.inf, 2, callers)), math.inf)
            print(f"engine saturation, {callers} only: {fmt(one)}", flush=True)
            results[f"saturation_{callers}"] = one
    if "disconnects" in phases:
        results["disconnects"] = disconnects(url, metrics_url, key)
        print(f"disconnects: {results['disconnects']}", flush=True)
    return results


def again(args: argparse.Namespace) -> None:
    """Run ``args.again``'s engine phases again into the results file; the rest stays."""
    path = args.out / "serve_traffic.json"
    payload = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        config, key, _ = setup_home(Path(tmp), overrides(args.model_cache))
        with server(HERE.parent, config.home, overrides(args.model_cache)) as (url, metrics):
            drive(url, key, traffic(8, math.inf, 99))  # warm-up
            phases = tuple(args.again.split(","))
            payload["engine"] |= engine_only(url, metrics, key, payload["requests"], phases)
    payload["goals"] = goals(payload["batch"], payload["engine"])
    payload.setdefault("again", []).append({"phases": args.again, "date": time.strftime("%F")})
    print(json.dumps(payload["goals"], indent=2))
    write_result("serve_traffic", {k: v for k, v in payload.items() if k not in HEAD}, args.out)


def fmt(r: dict[str, Any]) -> str:
    return (
        f"{r['completion_tokens_per_s']:.1f} tok/s, {r['requests_per_s']:.3f} req/s, "
        f"TTFT p50/p99 {r['ttft_s']['p50']:.2f}/{r['ttft_s']['p99']:.2f} s, "
        f"ITL {1000 * r['itl_s']['p50']:.0f}/{1000 * r['itl_s']['p99']:.0f} ms, "
        f"e2e {r['e2e_s']['p50']:.2f}/{r['e2e_s']['p99']:.2f} s, {r['errors']} errors"
    )


def goals(batch: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    def at_70(r: dict[str, Any], metric: str, q: str) -> float:
        point = r["curve"].get("0.7")  # absent when --loads leaves 0.7 out
        return point[metric][q] if point else math.nan

    saturation = (
        engine["saturation"]["completion_tokens_per_s"]
        / batch["saturation"]["completion_tokens_per_s"]
    )
    e2e = at_70(engine, "e2e_s", "p50") / at_70(batch, "e2e_s", "p50")
    ttft = at_70(engine, "ttft_s", "p99") / at_70(batch, "ttft_s", "p99")
    mixtures = (
        engine["saturation_base"]["completion_tokens_per_s"]
        / engine["saturation_mixtures"]["completion_tokens_per_s"]
    )
    steps = engine["disconnects"]["tokens_after_disconnect_per_stream"]
    return {
        "saturation_tokens_per_s_ratio": saturation,
        "e2e_p50_ratio_at_0.7": e2e,
        "ttft_p99_ratio_at_0.7": ttft,
        "base_over_mixtures_at_saturation": mixtures,
        "steps_after_disconnect_per_stream": steps,
        "met": {
            "saturation >= 1.5x": saturation >= 1.5,
            "e2e p50 <= 0.6x at 0.7": e2e <= 0.6,
            "TTFT p99 <= 0.5x at 0.7": ttft <= 0.5,
            "mixtures <= 1.15x base": mixtures <= 1.15,
            "disconnect frees its row within one step": steps <= 1,
        },
    }


def plot(path: Path, batch: dict[str, Any], engine: dict[str, Any]) -> None:
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for metric, title in (("ttft_s", "TTFT"), ("e2e_s", "end-to-end"), ("itl_s", "inter-token")):
        for q in ("p50", "p99"):
            panels.setdefault(f"{title} latency (s)", {})
            for name, r in (("@serve.batch", batch), ("engine", engine)):
                panels[f"{title} latency (s)"][f"{name} {q}"] = [
                    (p["offered_requests_per_s"], p[metric][q]) for p in r["curve"].values()
                ]
    panel_lines(
        path,
        title="latency against offered load (Poisson arrivals)",
        panels=panels,
        xlabel="offered load (requests/s)",
        log=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of 617e812 (required)")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--loads", default="0.5,0.7,1,1.5,2.5")
    parser.add_argument(
        "--again",
        help="only run these engine phases again (mixtures, disconnects; comma-separated) and "
        "update results/serve_traffic.json with them",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.loads = [float(x) for x in args.loads.split(",")]
    args.model_cache = Path("~/.adapterswap/models").expanduser()
    if args.again:
        return again(args)
    if args.baseline is None:
        parser.error("--baseline DIR is required: git worktree add DIR 617e812")
    with tempfile.TemporaryDirectory() as tmp:
        config, key, _ = setup_home(Path(tmp), overrides(args.model_cache))
        batch, capacity = run_engine("batch", args.baseline, config.home, key, args, None)
        engine, _ = run_engine("engine", HERE.parent, config.home, key, args, capacity)
    met = goals(batch, engine)
    print(json.dumps(met, indent=2))
    payload = {
        "requests": args.requests,
        "cores": os.cpu_count(),
        "batch": batch,
        "engine": engine,
        "goals": met,
    }
    write_result("serve_traffic", payload, args.out)
    plot(args.out / "serve_traffic.png", batch, engine)


if __name__ == "__main__":
    main()
