"""The base model served by AdapterSwap beside llama.cpp serving the same GGUF file.

    python benchmarks/serve_peer.py [--seconds 30] [--new-tokens 64]

The peer is ``llama-cpp-python``'s OpenAI server, an optimised C++ engine, installed by this
script (not by the product) into ``.venv-peer`` the first time: it compiles llama.cpp, which
takes minutes. Both serve the embedded ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp runs
its 4-bit weights as they are; AdapterSwap dequantises them to fp32 once) on all cores:
llama.cpp with ``--n_threads`` = the cores, AdapterSwap as ``serve_traffic.py`` runs it.

For 1 and then 8 concurrent clients, each sends greedy ``/v1/completions`` in a loop for
``seconds`` (after a warm-up), base model only, ``new-tokens`` tokens each (end of text
suppressed: ``ignore_eos`` here, a -100 logit bias there). Reported: completion tokens/s and
latency p50 per server and client count, and ours / llama.cpp.

Writes results/serve_peer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
from _common import RESULTS, free_port, write_result
from compose_overhead import PROMPTS
from serve_throughput import overrides, setup_home
from serve_traffic import HERE, server

from adapterswap.config import ModelSettings
from adapterswap.models.base import load_tokenizer
from adapterswap.models.gguf import find_embedded_gguf

PEER_VENV = HERE.parent / ".venv-peer"
PEER_PACKAGE = "llama-cpp-python[server]==0.3.36"
CLIENTS = (1, 8)
END_TOKENS = ("<|endoftext|>", "<|im_end|>")


def peer_python() -> Path:
    """The peer's interpreter, its virtual environment made and filled the first time."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing {PEER_PACKAGE} into {PEER_VENV} (it compiles llama.cpp: minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PEER_PACKAGE], check=True)
    return python


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: llama.cpp's server exited ({process.returncode})")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("error: llama.cpp's server did not answer within 120 s")


async def closed_loop(
    url: str, headers: dict[str, str], body: dict[str, Any], clients: int, seconds: float
) -> dict[str, Any]:
    """``clients`` tasks asking in a loop until ``seconds`` have passed."""
    latencies: list[float] = []
    tokens = [0]
    deadline = time.perf_counter() + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            payload = {**body, "prompt": PROMPTS[c % len(PROMPTS)]}
            response = await http.post(f"{url}/v1/completions", json=payload, headers=headers)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens[0] += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "completion_tokens_per_s": tokens[0] / elapsed,
        "requests": len(latencies),
        "p50_s": statistics.median(latencies),
    }


def measure(
    url: str, headers: dict[str, str], body: dict[str, Any], seconds: float, name: str
) -> dict[str, Any]:
    asyncio.run(closed_loop(url, headers, body, 2, 5))  # warm-up
    results = {}
    for clients in CLIENTS:
        results[str(clients)] = asyncio.run(closed_loop(url, headers, body, clients, seconds))
        print(f"{name}, {clients} client(s): {results[str(clients)]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    model_cache = Path("~/.adapterswap/models").expanduser()
    gguf = find_embedded_gguf()
    eos = load_tokenizer_eos(model_cache)
    common = {"max_tokens": args.new_tokens, "temperature": 0}
    peer = {**common, "logit_bias": {str(t): -100 for t in eos}}
    ours = {**common, "adapters": "none", "ignore_eos": True}
    python, port = peer_python(), free_port()
    process = subprocess.Popen(
        [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(cores),
            "--n_ctx",
            "2048",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process)
        llama = measure(f"http://127.0.0.1:{port}", {}, peer, args.seconds, "llama.cpp")
    finally:
        process.terminate()
        process.wait(timeout=60)
    with tempfile.TemporaryDirectory() as tmp:
        config, key, _ = setup_home(Path(tmp), overrides(model_cache))
        with server(HERE.parent, config.home, overrides(model_cache)) as (url, _metrics):
            adapterswap = measure(
                url, {"Authorization": f"Bearer {key}"}, ours, args.seconds, "AdapterSwap"
            )
    ratio = {
        c: adapterswap[c]["completion_tokens_per_s"] / llama[c]["completion_tokens_per_s"]
        for c in llama
    }
    print(f"AdapterSwap / llama.cpp completion tokens/s: {ratio}")
    write_result(
        "serve_peer",
        {
            "cores": cores,
            "seconds": args.seconds,
            "new_tokens": args.new_tokens,
            "peer": PEER_PACKAGE,
            "gguf": gguf.name,
            "llama_cpp": llama,
            "adapterswap": adapterswap,
            "ours_over_llama_cpp": ratio,
        },
        args.out,
    )


def load_tokenizer_eos(model_cache: Path) -> list[int]:
    """The embedded model's end-of-text token ids, suppressed on the peer's side."""
    tokenizer = load_tokenizer(ModelSettings(spec="embedded"), model_cache)
    vocab = tokenizer.get_vocab()
    return sorted({tokenizer.eos_token_id} | {vocab[t] for t in END_TOKENS if t in vocab})


if __name__ == "__main__":
    main()
