"""Helpers shared by tests: a free port, a float64 model for exactness tests, real adapter
versions without training, recorded jobs, the whole HTTP app in one process (and served on a
loopback port), and the tiny model's settings (the fixtures built on them are in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import uvicorn
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adapterswap.api.app import create_app
from adapterswap.api.auth import Authenticator
from adapterswap.api.gateway import build_gateway
from adapterswap.api.model_client import LocalModelClient
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.replica import ModelReplica
from adapterswap.models.base import LoadedModel, base_model_identity, load_base_model
from adapterswap.route.stats import compute_shard_stats, save_shard_stats
from adapterswap.storage.artifacts import write_adapter_version
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import AdapterManifest, BaseModelId, RouterInfo, TrainingMetrics
from adapterswap.store.records import JobRecord
from adapterswap.store.registry import AdapterRegistry
from adapterswap.types import AdapterRef

# Random LoRA adapters of different ranks, alphas and targets (rsLoRA on B), for composition.
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
A, B, C = AdapterRef("a", 1), AdapterRef("b", 1), AdapterRef("c", 2)
LORA_SPECS: dict[AdapterRef, dict[str, Any]] = {
    A: {"r": 4, "lora_alpha": 8, "target_modules": ALL},
    B: {"r": 8, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    C: {"r": 2, "lora_alpha": 3, "target_modules": ["k_proj", "o_proj", "gate_proj", "up_proj"]},
}
LORA_SPECS[B]["use_rslora"] = True


def hand_merged(base: torch.nn.Module, dirs: dict, mix: list[tuple[AdapterRef, float]]):
    """A copy of ``base`` with ``W += w · s · B A`` written into its Linear weights."""
    model = copy.deepcopy(base)
    for ref, weight in mix:
        config = json.loads((dirs[ref] / "adapter_config.json").read_text())
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / (math.sqrt(r) if config["use_rslora"] else r)
        tensors = load_file(dirs[ref] / "adapter_model.safetensors")
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                with torch.no_grad():
                    model.get_submodule(module).weight += weight * scale * (b @ a)
    return model


def save_random_lora(base: torch.nn.Module, out: Path, seed: int, **spec: Any) -> Path:
    """A peft LoRA of ``base`` with random (not zero) B, saved to ``out``."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **spec))
    peft_model.save_pretrained(out)
    return out


# Raw HTTP, for what a client library will not send: a lying Content-Length, an endless body.
CHUNKED = "Transfer-Encoding: chunked"
CHUNK = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # one 16 KiB chunk of a chunked body


def post_head(key: str | None, framing: str) -> bytes:
    """The head of a ``POST /v1/completions`` with ``framing`` (its Content-Length or
    Transfer-Encoding header) and the key, if any."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{auth}{framing}\r\n\r\n"
    ).encode()


def push(port: int, head: bytes, chunk: bytes, cap: int) -> tuple[bytes, int]:
    """Send ``head``, then ``chunk`` over and over until the server answers or ``cap`` bytes
    went out; returns (what the server answered, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.sendall(head)
    sock.setblocking(False)
    sent, answer = 0, b""
    with sock:
        while sent < cap:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"\r\n\r\n" not in answer:
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
    return answer, sent


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_serving(app: Any) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free loopback port, in a thread; yields the port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def metrics_export() -> tuple[dict[str, Any], str]:
    """``ray.init`` options that export Ray's metrics on a free port, every 0.5 s, and the
    URL Prometheus would scrape them from."""
    port = free_port()
    options = {"_metrics_export_port": port, "_system_config": {"metrics_report_interval_ms": 500}}
    return options, f"http://127.0.0.1:{port}/metrics"


# Log-probabilities computed two ways in float64 (a batched forward against a direct
# log-softmax, a KV-cached decode step against a full forward). Their logsumexp adds
# V = 49,152 terms exp(z - max) ≤ 1; any order of that sum is within V·u·Σ of the exact one
# (u = 2^-53), so the log moves by at most V·u ≈ 5.5e-12, and the logits themselves, sums of
# 64 products, by ~1e-14. 1e-10 sits above that worst case and far below a real error (a
# wrong position or token is off by > 1e-3); float32 would be off by ~1e-6.
LOGP = {"rtol": 0.0, "atol": 1e-10}


class _Float64RMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm in its input's dtype. transformers' own rounds every norm through float32,
    so two float64 paths 1e-16 apart could land one float32 step (~1e-7) apart."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_float64(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a Llama, e.g. tiny-random) in float64 end to end, in place, for exactness
    tests: two float64 computations of one value that add in different orders then agree to
    ~1e-15, on any processor. Works after an AdapterBank was injected (its buffers follow)."""
    model.to(torch.float64)
    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = _Float64RMSNorm
    return model


def publish_random_adapter(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    embed,
    adapter_id: str,
    group: str,
    texts: list[str],
    seed: int,
    doc_ids: list[str] | None = None,
) -> AdapterRef:
    """Publish a version whose LoRA is random (B != 0) but whose files, manifest, router
    statistics and store records are the real thing, as training would leave them."""
    torch.manual_seed(seed)
    model = load_base_model(config.model, config.model_cache_dir).model
    lora = LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        target_modules=config.lora.target_modules,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    lineage = doc_ids or [f"{adapter_id}-{i}" for i in range(len(texts))]
    version = registry.register_version(adapter_id, group, "x", lineage).version
    stats = compute_shard_stats(texts, embed, "embedded:all-MiniLM-L6-v2")
    ref = AdapterRef(adapter_id, version)
    manifest = untrained_manifest(
        ref, group, lineage, base_model_identity(config.model, config.model_cache_dir)
    )
    write_adapter_version(
        StorageLayout.from_config(config).version(ref),
        peft_model,
        save_shard_stats(stats),
        manifest,
    )
    registry.activate(adapter_id, version)
    return ref


def untrained_manifest(
    ref: AdapterRef, group: str, doc_ids: list[str], base_model: BaseModelId
) -> AdapterManifest:
    """A complete manifest for a version that was not trained: fixed times and metrics, so
    the same version written twice is the same bytes."""
    return AdapterManifest(
        adapter_id=ref.id,
        version=ref.version,
        shard=ref.id,
        group=group,
        doc_ids=sorted(doc_ids),
        data_hash="sha256:untrained",
        base_model=base_model,
        lora={},
        training={},
        seed=0,
        router=RouterInfo(embedder="embedded:all-MiniLM-L6-v2"),
        metrics=TrainingMetrics(
            final_loss=None, steps=0, tokens=0, wall_time_s=0.0, tokens_per_s=None
        ),
        created_at="2026-01-01T00:00:00+00:00",
    )


class RecordedJobs:
    """The gateway's jobs without Ray: submitting records a pending job that nothing runs.

    For HTTP-shape and permission tests; tests/ray/test_serve.py runs real training jobs.
    """

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry

    runner = "test"

    def submit_training(self, actor: str) -> JobRecord:
        return self.registry.create_job("train", self.runner, actor=actor)

    def start_deletion(self, job: JobRecord) -> None:
        pass

    def get(self, job_id: str) -> JobRecord:
        return self.registry.get_job(job_id)


def in_process_app(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    *,
    jobs=None,
    key_cache_ttl_s: float | None = None,
):
    """The real FastAPI app over a real gateway and one model replica, in this process.

    Returns ``(app, replica)``. Serve it with ``fastapi.testclient.TestClient(app)``; the
    gateway is ``app.state.gateway``. ``jobs`` defaults to :class:`RecordedJobs`.
    """
    replica = ModelReplica(
        config,
        registry.active_snapshot,
        epoch=registry.epoch,
        changes=registry.active_changes,
    )
    ttl = config.serve.key_cache_ttl_s if key_cache_ttl_s is None else key_cache_ttl_s
    app = create_app()
    app.state.gateway = build_gateway(
        config,
        store=registry,
        model=LocalModelClient(replica),
        model_id=config.model.spec,
        tokenizer=replica.tokenizer,
        adapters=replica.source,
        jobs=jobs or RecordedJobs(registry),
        authenticator=Authenticator(registry.lookup_key, ttl),
    )
    return app, replica


def http_world_app(
    tiny_config: Callable[..., AdapterSwapConfig],
) -> tuple[Any, dict[str, str], dict[str, AdapterRef], ModelReplica]:
    """The real HTTP app (:func:`in_process_app`) on the tiny model in float64, with a
    random-LoRA adapter for each of two groups (``hr.b0001.000`` on :data:`HR_TEXTS`,
    ``finance.b0001.000`` on :data:`FIN_TEXTS`) and keys for every mix of hr, finance and
    legal (``keys["finance+hr"]``), plus an admin (``keys["admin"]``, hr).

    Returns ``(app, keys, refs, replica)``; ``tiny_config`` is the conftest's factory. The
    ``http_world`` fixture (tests/conftest.py) serves it in process, tests/clients/ over HTTP.
    """
    from adapterswap.models.embedder import load_embedder

    config = tiny_config(
        lora={"target_modules": ["q_proj", "v_proj", "down_proj"]},
        serve={"max_prompt_tokens": 64, "max_new_tokens": 32, "max_body_bytes": 4000},
    )
    registry = AdapterRegistry(config.db_path)
    embed = load_embedder(config.embedding).embed
    refs = {
        "hr": publish_random_adapter(config, registry, embed, "hr.b0001.000", "hr", HR_TEXTS, 1),
        "finance": publish_random_adapter(
            config, registry, embed, "finance.b0001.000", "finance", FIN_TEXTS, 2
        ),
    }
    app, replica = in_process_app(config, registry)
    exact_float64(replica.loaded.model)  # log-probabilities are compared exactly
    keys = {
        "hr": registry.create_key("hana", ["hr"])[0],
        "finance": registry.create_key("finn", ["finance"])[0],
        "legal": registry.create_key("lee", ["legal"])[0],
        "admin": registry.create_key("root", ["hr"], admin=True)[0],
    }
    for combo in (("finance", "hr"), ("hr", "legal"), ("finance", "hr", "legal")):
        keys["+".join(combo)] = registry.create_key("multi", list(combo))[0]
    return app, keys, refs, replica


# Two groups' documents, on topics the router tells apart (the `http_world` fixture's).
HR_TEXTS = [
    "New parents get 23 weeks of paid parental leave.",
    "Parental leave can be split into three blocks.",
]
FIN_TEXTS = [
    "Vendor invoices are paid within 37 days.",
    "Expense claims above 40 crowns need a receipt.",
]


# The tiny random Llama (built in code, never downloaded) with LoRA on two projections and a
# training run of a few 32-token steps: what the `tiny_config` fixture (tests/conftest.py)
# starts from, before a test's own settings.
TINY = {
    "model": {"spec": "tiny-random"},
    "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]},
    "sharding": {"strategy": "sequential"},
    "training": {"max_steps": 4, "seq_len": 32, "batch_size": 2},
}


def set_flags(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Nested ``settings`` as the ``section.field=value`` strings of ``--set`` (and of the Serve
    app's ``overrides``); a value is written as JSON, which the YAML parser reads back as is."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, Mapping) and value:
            flags += set_flags(value, f"{prefix}{name}.")
        else:
            flags.append(f"{prefix}{name}={json.dumps(value)}")
    return flags


def private_copy(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with a model of its own, for a test that changes it (peft injects LoRA layers
    in place, training moves weights): the run's shared tiny model stays as built."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))


def ingest_groups(
    config: AdapterSwapConfig, directory: Path, name: str, groups: dict[str, list[str]], batch: str
) -> None:
    """Ingest ``groups``' texts ({group: [text, ...]}) as batch ``batch`` through a JSONL file
    ``<directory>/<name>.jsonl`` (document ids ``<name>-<group>-<i>``), no embedding."""
    from adapterswap.catalog.ingest import ingest_files

    path = directory / f"{name}.jsonl"
    rows = [
        {"id": f"{name}-{g}-{i}", "text": t, "group": g}
        for g, texts in groups.items()
        for i, t in enumerate(texts)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest_files([path], config, embed=None, batch=batch)
