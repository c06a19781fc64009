"""Serving throughput over HTTP through Ray Serve: composed vs base, and ours vs plain peft.

    python benchmarks/serve_throughput.py [--clients 8] [--rounds 3] [--new-tokens 32]

A temporary home gets 8 published rank-16 adapters on the embedded model (random LoRA
weights; real files, router statistics and store records). A local Ray (2 CPUs) serves:

- the AdapterSwap app (one model replica and its continuous-batching engine), and
- a plain-peft server: one replica of a FastAPI deployment that, per request, builds
  ``add_weighted_adapter(..., combination_type="cat")``, activates it, generates and deletes
  it, one request at a time (peft cannot put rows with different mixtures in one batch).

Side by side in interleaved rounds (median per case), ``clients`` threads each send one
``/v1/completions`` request at once, greedy, exactly N new tokens (``ignore_eos``):

- ``base``: ``adapters: "none"`` on every request;
- ``composed``: every client its own explicit 3-adapter mixture (8 distinct mixtures);
- ``peft``: the same mixtures against the plain-peft server.

Printed and written to benchmarks/results/serve_throughput.json: wall time per round,
completion tokens per second, composed/base beside the arithmetic floor, ours/peft.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx2 as httpx
import ray
import torch
from _common import serve_on_loopback, write_result
from compose_overhead import PROMPTS, arithmetic_floor, load_model
from fastapi import FastAPI
from ray import serve

from adapterswap.config import load_config
from adapterswap.models.embedder import load_embedder
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from support import publish_random_adapter  # noqa: E402  (tests' helper: real files, random LoRA)

ADAPTERS, K = 8, 3


def mixture(client: int) -> list[dict[str, Any]]:
    """Client ``c``'s own 3 adapters out of 8, with weights that differ per client."""
    ids = [f"eng.b0001.{(client + 3 * j) % ADAPTERS:03d}" for j in range(K)]
    weights = (0.6 - 0.02 * client, 0.3, 0.1 + 0.02 * client)
    return [{"id": i, "weight": w} for i, w in zip(ids, weights, strict=True)]


peft_app = FastAPI()


@serve.ingress(peft_app)
class PeftServer:
    """Plain peft, as a team would serve per-request mixtures without AdapterSwap."""

    def __init__(self, adapter_dirs: dict[str, str], model_cache: str, threads: int) -> None:
        from peft import PeftModel

        from adapterswap.config import ModelSettings
        from adapterswap.models.base import load_base_model

        torch.set_num_threads(threads)
        loaded = load_base_model(ModelSettings(spec="embedded", device="cpu"), Path(model_cache))
        self.tokenizer = loaded.tokenizer
        # peft adapter names cannot contain ".", which shard ids do.
        self.names = {adapter_id: f"a{i}" for i, adapter_id in enumerate(adapter_dirs)}
        paths = [adapter_dirs[adapter_id] for adapter_id in self.names]
        self.model = PeftModel.from_pretrained(loaded.model, paths[0], adapter_name="a0")
        for i, path in enumerate(paths[1:], 1):
            self.model.load_adapter(path, adapter_name=f"a{i}")
        self.lock = threading.Lock()  # one mixture at a time: peft's active adapter is global

    @peft_app.post("/v1/completions")
    def complete(self, body: dict) -> dict:  # builtins only: the class is pickled by value
        names = [self.names[a["id"]] for a in body["adapters"]]
        weights = [a["weight"] for a in body["adapters"]]
        max_tokens = body["max_tokens"]
        inputs = self.tokenizer(body["prompt"], return_tensors="pt")
        with self.lock, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Adapter mix was active": yes, on purpose
            self.model.add_weighted_adapter(names, weights, "mix", combination_type="cat")
            self.model.set_adapter("mix")
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            self.model.delete_adapter("mix")
        new = out[0, inputs["input_ids"].shape[1] :]
        return {"choices": [{"text": self.tokenizer.decode(new)}], "usage": {"n": len(new)}}


def overrides(model_cache: Path) -> list[str]:
    return [f"model.cache_dir={model_cache}"]


def setup_home(root: Path, settings: list[str]) -> tuple[Any, str, dict[str, str]]:
    """A home with 8 active adapters of group ``eng`` and a key that holds ``eng``."""
    config = load_config(home=str(root / "home"), environ={}, overrides=settings)
    registry = AdapterRegistry(config.db_path)
    embed = load_embedder(config.embedding).embed
    dirs = {}
    for i in range(ADAPTERS):
        adapter_id = f"eng.b0001.{i:03d}"
        ref = publish_random_adapter(
            config, registry, embed, adapter_id, "eng", [f"Engineering note {i}."], seed=i
        )
        dirs[adapter_id] = StorageLayout.from_config(config).version(ref).path
    key = registry.create_key("bench", ["eng"])[0]
    return config, key, dirs


def one_round(url: str, key: str, bodies: list[dict[str, Any]]) -> tuple[float, int]:
    """Send every body at once from its own thread; (wall seconds, completion tokens)."""

    def send(body: dict[str, Any]) -> int:
        with httpx.Client(timeout=600) as client:
            response = client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            response.raise_for_status()
            usage = response.json()["usage"]
            return usage.get("completion_tokens", usage.get("n"))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        tokens = sum(pool.map(send, bodies))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    model_cache = Path("~/.adapterswap/models").expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        settings = overrides(model_cache)
        config, key, dirs = setup_home(Path(tmp), settings)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            base = serve_on_loopback(config.home, settings, 1)
            peft = serve.deployment(PeftServer, ray_actor_options={"num_cpus": 0.5})
            serve.run(peft.bind(dirs, str(model_cache), threads), name="peft", route_prefix="/peft")
            median, tokens = measure(base, key, args)
        finally:
            serve.shutdown()
            ray.shutdown()
    report(median, tokens, args)


def measure(
    base_url: str, key: str, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, int]]:
    """Median wall seconds per case over interleaved rounds, after one warm-up round."""
    common = {"max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
    prompts = [PROMPTS[c % len(PROMPTS)] for c in range(args.clients)]
    cases = {
        "base": [{"prompt": p, "adapters": "none", **common} for p in prompts],
        "composed": [
            {"prompt": p, "adapters": mixture(c), **common} for c, p in enumerate(prompts)
        ],
        "peft": [
            {"prompt": p, "adapters": mixture(c), "max_tokens": args.new_tokens}
            for c, p in enumerate(prompts)
        ],
    }
    urls = {
        "base": f"{base_url}/v1/completions",
        "composed": f"{base_url}/v1/completions",
        "peft": f"{base_url}/peft/v1/completions",
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    tokens: dict[str, int] = {}
    for r in range(args.rounds + 1):
        for name, bodies in cases.items():
            seconds, tokens[name] = one_round(urls[name], key, bodies)
            print(f"round {r} {name:9s} {seconds:6.2f} s  {tokens[name]} tokens", flush=True)
            if r:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}, tokens


def report(median: dict[str, float], tokens: dict[str, int], args: argparse.Namespace) -> None:
    floors = arithmetic_floor(load_model().model, K, 16)
    memory_floor = 1 + min(ADAPTERS, args.clients * K) * floors["adapter_over_base"]
    composed_vs_base = median["composed"] / median["base"]
    ours_vs_peft = median["peft"] / median["composed"]
    rates = {name: tokens[name] / seconds for name, seconds in median.items()}
    for name, seconds in median.items():
        print(f"{name:9s} {seconds:6.2f} s per round  {rates[name]:6.1f} completion tokens/s")
    print(
        f"composed / base: {composed_vs_base:.3f}x  (FLOP floor {floors['floor']:.3f}x, "
        f"memory floor with U={min(ADAPTERS, args.clients * K)} {memory_floor:.3f}x; "
        f"{composed_vs_base / floors['floor']:.3f}x the FLOP floor)"
    )
    print(f"ours / plain peft throughput: {ours_vs_peft:.2f}x")
    goals = {
        "composed_within_1.10x_floor": composed_vs_base / floors["floor"] <= 1.10,
        "ours_at_least_3x_peft": ours_vs_peft >= 3,
    }
    print("goals:", goals)
    write_result(
        "serve_throughput",
        {
            "model": "embedded",
            "clients": args.clients,
            "rounds": args.rounds,
            "new_tokens": args.new_tokens,
            "torch_threads": os.cpu_count(),
            "load_average": os.getloadavg(),
            "seconds_per_round": median,
            "completion_tokens_per_s": rates,
            "composed_vs_base": composed_vs_base,
            "floor": floors["floor"],
            "memory_floor": memory_floor,
            "ours_vs_peft_throughput": ours_vs_peft,
            "goals": goals,
        },
    )


if __name__ == "__main__":
    main()
