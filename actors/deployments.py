"""The two Serve deployments, as ordinary classes: the model and the ingress.

- :class:`ModelDeployment` pins one base model per replica (``num_gpus: 1`` in the GPU
  config, a CPU share locally); its engine (``adapterswap.engine.loop``) batches concurrent
  requests continuously: each request is one row, with its own adapter mixture, joining
  and leaving the batch at any step.
- :class:`IngressDeployment` serves the FastAPI app: authentication against the store,
  routing, and calls to the model deployment through its handle.

Their collaborators come in through the constructor with the production ones as defaults,
as in Ray Serve LLM's ``LLMServer(llm_config, *, engine_cls=None, ...)``: the store client,
the replica id and the model loader (model), the store and the replicas' liveness oracle
(ingress). So a test builds either without Serve; ``actors.serve_app.build_app`` applies
``serve.deployment`` (and ``serve.ingress``) to them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.job_runner import RayJobs
from actors.metrics import ServeMetrics
from actors.model_handle import HandleModelClient
from actors.replica_oracle import ServeReplicaOracle
from actors.store_client import StoreClient
from adapterswap.api.app import create_app
from adapterswap.api.gateway import build_gateway
from adapterswap.api.model_client import LocalModelClient, StreamItem
from adapterswap.api.schemas import ChatRequest, CompletionRequest
from adapterswap.config import AdapterSwapConfig, ModelSettings
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.engine.epoch_watch import EpochWatcher
from adapterswap.engine.replica import InferenceJob, ModelReplica
from adapterswap.engine.requests import GenerationResult, PromptScores
from adapterswap.errors import AdapterSwapError
from adapterswap.models.base import LoadedModel, hash_base_model, load_base_model, load_tokenizer
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.privacy import private_process
from adapterswap.store.protocol import Store

# (model settings, cache dir) -> the base model, ready to serve.
ModelLoader = Callable[[ModelSettings, Path], LoadedModel]


def _serve_replica_id() -> str:
    """This replica's id as Serve's controller lists it (see ServeReplicaOracle)."""
    return serve.get_replica_context().replica_id.unique_id


class ModelDeployment:
    """One base model per replica; concurrent requests are batched, one row each."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        store: Store | None = None,
        replica_id: str | None = None,
        load_model: ModelLoader = load_base_model,
    ) -> None:
        """``store`` defaults to the store actor's client, ``replica_id`` to Serve's id of
        this replica (the deletion barrier knows the replica by it)."""
        private_process()  # it writes the model cache
        self.config = AdapterSwapConfig.model_validate(config)
        # Ray sets OMP_NUM_THREADS=floor(num_cpus) or 1 for a fractional replica; a CPU replica
        # that shares a node with a store and trainers still wants every core for its batches.
        torch.set_num_threads(self.config.serve.cpu_threads or os.cpu_count() or 1)
        store = store or StoreClient.connect(self.config)
        self.replica = ModelReplica(
            self.config,
            store.active_snapshot,
            loaded=load_model(self.config.model, self.config.model_cache_dir),
            epoch=store.epoch,
            changes=store.active_changes,
        )
        self.local = LocalModelClient(self.replica)
        self.metrics = ServeMetrics()
        self.watcher = EpochWatcher(
            self.replica.sync,
            store,
            replica_id=replica_id or _serve_replica_id(),
            poll_s=self.config.serve.epoch_poll_s,
            heartbeat_s=self.config.serve.replica_heartbeat_s,
            report=self.replica.report,
        )

    async def generate_one(self, job: InferenceJob) -> GenerationResult | AdapterSwapError:
        """One job per call; the engine batches concurrent calls step by step."""
        (result,) = await self.generate([job])
        return result

    async def generate(self, jobs: list[InferenceJob]) -> list[GenerationResult | AdapterSwapError]:
        """The jobs' results. A job that cannot run comes back as its error, in its place:
        it fails alone."""
        self.metrics.record_engine(self.replica.engine.stats)
        results = await self.local.generate(jobs)
        self.metrics.record_composition(self.replica.engine.stats.compose_ms)
        self._record(results)
        return results

    def _record(self, results: list[Any]) -> None:
        for result in results:
            if isinstance(result, GenerationResult):
                self.metrics.record_generation(result)
        self.metrics.record_engine(self.replica.engine.stats)
        self.metrics.record_tiers(self.replica.tiers.stats())
        self.metrics.record_lookups(self.replica.adapter_hits, self.replica.adapter_misses)

    async def score(
        self, jobs: list[InferenceJob], top_logprobs: int
    ) -> list[PromptScores | AdapterSwapError]:
        return await self.local.score(jobs, top_logprobs)

    async def stream(self, job: InferenceJob) -> AsyncIterator[StreamItem]:
        """The job's text deltas, then its GenerationResult (finish reason, token counts)."""
        self.metrics.record_engine(self.replica.engine.stats)
        async for item in self.local.stream(job):
            if isinstance(item, GenerationResult):
                self._record([item])
            yield item

    def __del__(self) -> None:
        """Serve shuts the replica down: no delete should wait for it any more."""
        self.watcher.stop()
        self.replica.close()


class IngressDeployment:
    """Authentication, routing and the OpenAI endpoints; the model runs elsewhere."""

    def __init__(
        self,
        model: DeploymentHandle,
        config: dict[str, Any],
        *,
        store: Store | None = None,
        replica_alive: Callable[[str], bool] | None = None,
    ) -> None:
        """``store`` defaults to the store actor's client, ``replica_alive`` to asking Serve's
        controller (the deletion barrier drops a model replica only when Serve reports it
        dead)."""
        private_process()  # it writes the catalog
        self.config = AdapterSwapConfig.model_validate(config)
        store = store or StoreClient.connect(self.config)
        jobs = RayJobs(self.config, store)
        source = StorageAdapterSource(
            StorageLayout.from_config(self.config),
            hash_base_model(self.config.model, self.config.model_cache_dir),
        )
        self.gateway = build_gateway(
            self.config,
            store=store,
            model=HandleModelClient(model),
            model_id=self.config.model.spec,
            tokenizer=load_tokenizer(self.config.model, self.config.model_cache_dir),
            adapters=source,
            jobs=jobs,
            on_routed=ServeMetrics().record_routing,
            replica_alive=replica_alive
            or ServeReplicaOracle(timeout_s=self.config.serve.store_timeout_s),
        )
        jobs.resume_deletions()  # a crash left a delete unfinished: finish it now

    # The same operations for Python callers inside the cluster:
    #   handle = serve.get_app_handle("adapterswap"); await handle.completions.remote(key, {...})
    async def completions(self, api_key: str, body: dict[str, Any]) -> dict[str, Any]:
        principal = await self.gateway.auth.authenticate_async(f"Bearer {api_key}")
        return await self.gateway.complete(principal, CompletionRequest.model_validate(body))

    async def chat(self, api_key: str, body: dict[str, Any]) -> dict[str, Any]:
        principal = await self.gateway.auth.authenticate_async(f"Bearer {api_key}")
        return await self.gateway.chat(principal, ChatRequest.model_validate(body))

    async def adapters(
        self, api_key: str, limit: int = 100, after: str | None = None
    ) -> dict[str, Any]:
        principal = await self.gateway.auth.authenticate_async(f"Bearer {api_key}")
        return await asyncio.to_thread(self.gateway.list_adapters, principal, limit, after)

    def __serve_build_asgi_app__(self) -> Any:
        """The FastAPI app, built on the replica after __init__ so it holds this gateway."""
        app = create_app()
        app.state.gateway = self.gateway
        return app
