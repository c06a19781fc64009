"""The Serve deployments are ordinary classes: built here without Ray or Serve, their store,
replica id, model loader and liveness oracle given through the constructor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.testclient import TestClient
from support import HR_TEXTS, private_copy, publish_random_adapter

from actors.deployments import IngressDeployment, ModelDeployment
from actors.metrics import ServeMetrics
from adapterswap.engine.loop import EngineStats
from adapterswap.engine.replica import InferenceJob
from adapterswap.engine.requests import GenerationResult, SamplingParams
from adapterswap.store.registry import AdapterRegistry


async def collect(stream: AsyncIterator[object]) -> list[object]:
    return [item async for item in stream]


def test_the_model_deployment_builds_and_generates_without_serve(tiny_config, tiny):
    config = tiny_config()
    registry = AdapterRegistry(config.db_path)
    loads = []

    def load_model(settings, cache_dir):
        loads.append(settings.spec)
        return private_copy(tiny)  # the bank is injected into the model it serves

    deployment = ModelDeployment(
        config.model_dump(), store=registry, replica_id="replica-1", load_model=load_model
    )
    try:
        assert loads == ["tiny-random"]
        # registered with the deletion barrier, under the id it was given, before any request
        assert [r[:2] for r in registry.live_replicas(60)] == [("replica-1", 0)]
        job = InferenceJob(prompt="Hello", params=SamplingParams(max_tokens=3, ignore_eos=True))
        (result,) = asyncio.run(deployment.generate([job]))
        assert isinstance(result, GenerationResult) and result.completion_tokens == 3
        # a stream: the text deltas, then the result (finish reason, counts) for the last chunk
        *deltas, last = asyncio.run(collect(deployment.stream(job)))
        assert isinstance(last, GenerationResult) and last.finish_reason == "length"
        assert last.completion_tokens == 3 and "".join(deltas) == last.text
    finally:
        deployment.watcher.stop()


def test_the_token_counter_counts_what_the_engine_sampled_a_cancelled_stream_included(
    tiny_config, tiny
):
    config = tiny_config()
    deployment = ModelDeployment(
        config.model_dump(),
        store=AdapterRegistry(config.db_path),
        replica_id="replica-1",
        load_model=lambda settings, cache_dir: private_copy(tiny),
    )
    counted: list[float] = []
    deployment.metrics.tokens.inc = counted.append
    long = InferenceJob(prompt="Hello", params=SamplingParams(max_tokens=400, ignore_eos=True))
    short = InferenceJob(prompt="Hi", params=SamplingParams(max_tokens=3, ignore_eos=True))

    async def hang_up_after_one_delta() -> None:
        stream = deployment.stream(long)
        await anext(stream)
        await stream.aclose()  # the client went away: the row is cancelled

    try:
        asyncio.run(hang_up_after_one_delta())
        asyncio.run(deployment.generate([short]))  # its arrival and completion count tokens
        engine = deployment.replica.engine
        assert 3 < sum(counted) == engine.stats.tokens_sampled < 3 + 400
        assert engine.stats.cancelled == 1
    finally:
        deployment.watcher.stop()


def test_concurrent_requests_count_each_adapter_lookup_once(tiny_config, tiny, embed):
    config = tiny_config()
    registry = AdapterRegistry(config.db_path)
    ref = publish_random_adapter(config, registry, embed, "hr.b1.000", "hr", HR_TEXTS, 0)
    deployment = ModelDeployment(
        config.model_dump(),
        store=registry,
        replica_id="replica-1",
        load_model=lambda settings, cache_dir: private_copy(tiny),
    )
    counted: list[float] = []
    deployment.metrics.cache_hits.inc = lambda n, tags=None: counted.append(n)
    deployment.metrics.cache_misses.inc = lambda n, tags=None: counted.append(n)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    jobs = [InferenceJob(prompt=p, params=params, mixture=((ref, 1.0),)) for p in "ABC"]

    async def together() -> list:
        return await asyncio.gather(*(deployment.generate([job]) for job in jobs))

    try:
        assert all(isinstance(r, GenerationResult) for (r,) in asyncio.run(together()))
        # one lookup per request, however their lifetimes overlapped
        assert sum(counted) == 3
    finally:
        deployment.watcher.stop()


def test_deferred_admissions_count_once_each_by_reason():
    metrics, counted = ServeMetrics(), []
    metrics.deferred.inc = lambda n, tags=None: counted.append((tags["reason"], n))
    metrics.record_engine(EngineStats(deferred_loading=2, deferred_bank_full=1))
    metrics.record_engine(EngineStats(deferred_loading=2, deferred_bank_full=1))  # no change
    metrics.record_engine(EngineStats(deferred_loading=5, deferred_bank_full=1))
    assert counted == [("adapters_loading", 2), ("bank_full", 1), ("adapters_loading", 3)]


def test_the_ingress_builds_and_answers_without_serve(tiny_config):
    config = tiny_config()
    registry = AdapterRegistry(config.db_path)
    key = registry.create_key("ann", ["hr"])[0]
    ingress = IngressDeployment(
        object(),  # the model's handle: this test makes no model call
        config.model_dump(),
        store=registry,
        replica_alive=lambda replica_id: True,
    )
    gateway = ingress.gateway
    assert gateway.store is registry and gateway.replica_alive("replica-1")
    client = TestClient(ingress.__serve_build_asgi_app__())
    answer = client.get("/v1/adapters", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200
    assert answer.json() == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    assert client.get("/v1/adapters").status_code == 401
