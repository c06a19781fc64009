"""Load: N concurrent clients for a fixed time against 1 and then 2 model replicas.

    python benchmarks/serve_load.py [--clients 8] [--seconds 30] [--new-tokens 16]

The home of serve_throughput.py (8 published rank-16 adapters on the embedded model). For each
replica count, the AdapterSwap app is deployed on a local Ray, warmed up, and ``clients``
threads each send ``/v1/completions`` with their own 3-adapter mixture in a loop for
``seconds`` (greedy, exactly N new tokens). Reported per replica count: requests and
completion tokens per second, latency p50 / p99, and errors; the 2-replica / 1-replica
throughput ratio is the scaling figure. Each replica runs torch on its share of the cores
(``serve.cpu_threads``), so two replicas on one machine split it rather than fight over it.

Writes results/serve_load.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import ray
from _common import RESULTS, free_port, write_result
from _plots import bar_chart
from compose_overhead import PROMPTS
from ray import serve
from serve_throughput import mixture, setup_home

from actors.serve_app import build_app


def run_load(url: str, key: str, clients: int, seconds: float, new_tokens: int) -> dict[str, Any]:
    """``clients`` threads asking in a loop until ``seconds`` have passed."""
    latencies: list[float] = []
    statuses: list[int] = []
    tokens = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(c: int) -> None:
        body = {
            "prompt": PROMPTS[c % len(PROMPTS)],
            "adapters": mixture(c),
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
                with lock:
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                        tokens[0] += response.json()["usage"]["completion_tokens"]

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    ordered = sorted(latencies) or [float("nan")]
    return {
        "requests": len(statuses),
        "errors": sum(1 for s in statuses if s != 200),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "completion_tokens_per_s": tokens[0] / elapsed,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    model_cache = Path("~/.adapterswap/models").expanduser()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home_settings = [f"model.cache_dir={model_cache}"]
        config, key, _ = setup_home(Path(tmp), home_settings)
        port = free_port()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}/v1/completions"
            for replicas in (1, 2):
                threads = {"serve": {"cpu_threads": max(1, cores // replicas)}}
                settings = {"model": {"cache_dir": str(model_cache)}, **threads}
                app = build_app({"home": config.home, "config": settings, "num_replicas": replicas})
                serve.run(app, name="adapterswap", route_prefix="/")
                run_load(url, key, args.clients, 3, args.new_tokens)  # warm-up
                results[str(replicas)] = run_load(
                    url, key, args.clients, args.seconds, args.new_tokens
                )
                print(f"{replicas} replica(s): {results[str(replicas)]}", flush=True)
                serve.delete("adapterswap")
        finally:
            serve.shutdown()
            ray.shutdown()
    scaling = results["2"]["completion_tokens_per_s"] / results["1"]["completion_tokens_per_s"]
    print(f"2 replicas / 1 replica, completion tokens/s: {scaling:.2f}x on {cores} cores")
    payload = {
        "model": "embedded",
        "clients": args.clients,
        "seconds": args.seconds,
        "new_tokens": args.new_tokens,
        "cores": cores,
        "replicas": results,
        "scaling_2_over_1": scaling,
    }
    write_result("serve_load", payload, args.out)
    bar_chart(
        args.out / "serve_load.png",
        title=f"{args.clients} clients for {args.seconds:g} s on {cores} cores; latency p50 / p99: "
        + ", ".join(f"{n}: {r['p50_s']:.2f} / {r['p99_s']:.2f} s" for n, r in results.items()),
        groups={
            f"{n} replica(s)": {"completion tokens/s": r["completion_tokens_per_s"]}
            for n, r in results.items()
        },
        ylabel="completion tokens per second",
    )


if __name__ == "__main__":
    main()
