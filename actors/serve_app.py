"""Ray Serve: the model and ingress deployments, and ``build_app`` for ``serve run/deploy``.

- ``ModelDeployment`` pins one base model per replica (``num_gpus: 1`` in the GPU config, a
  CPU share locally) and batches concurrent requests with ``@serve.batch``: each request is
  one row of the batch, with its own adapter mixture.
- ``IngressDeployment`` serves the FastAPI app: authentication against the AdapterStore
  actor, routing, and calls to the model deployment through its handle.

Both are ordinary classes wrapped by ``build_app``; importing this module starts nothing.
Serve YAML (``serve_configs/``) uses ``import_path: actors.serve_app:build_app`` with
``args`` validated into :class:`ServeAppArgs`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from actors.adapter_store import get_or_create_store
from actors.job_runner import RayJobs
from actors.metrics import ServeMetrics
from adapterswap.api.app import create_app
from adapterswap.api.auth import Authenticator
from adapterswap.api.gateway import Gateway
from adapterswap.api.schemas import ChatRequest, CompletionRequest
from adapterswap.config import AdapterSwapConfig, ServeSettings, load_config
from adapterswap.engine.epoch_watch import EpochWatcher
from adapterswap.engine.replica import InferenceJob, ModelReplica
from adapterswap.engine.requests import GenerationResult, PromptScores
from adapterswap.errors import AdapterSwapError, Overloaded, StoreUnavailable, unwrap_remote
from adapterswap.models.base import hash_base_model
from adapterswap.models.embedder import load_embedder
from adapterswap.route.active_set import ActiveSet
from adapterswap.storage.adapter_source import StorageAdapterSource
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.privacy import private_process

logger = logging.getLogger("adapterswap.serve")


class ServeAppArgs(BaseModel):
    """``args:`` of the Serve application (serve_configs/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(None, description="AdapterSwap home (default: ADAPTERSWAP_HOME).")
    config: str | None = Field(None, description="YAML config file.")
    overrides: list[str] = Field(default_factory=list, description="section.field=value items.")
    num_replicas: int | None = Field(
        None, ge=1, description="Fixed model replicas (no autoscaling)."
    )
    autoscaling: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config for the model."
    )


def _store_reader(config: AdapterSwapConfig) -> Any:
    """The store actor; call it through :func:`_read` and :class:`StoreProxy` (deadlines)."""
    return get_or_create_store(config)


# Every store call on a request path has a deadline (serve.store_timeout_s); this default is
# for callers that do not pass their config's.
DEFAULT_STORE_TIMEOUT_S: float = ServeSettings.model_fields["store_timeout_s"].default
# The registry's pure reads: sending one again is harmless, so they are retried across a
# store restart until their deadline. Every other method is a write, sent once: one in
# flight when the store died may have committed, and a second begin_delete or
# register_version would not be a no-op. Unknown names count as writes.
STORE_READS = frozenset(
    {
        "epoch",
        "get_version",
        "list_versions",
        "active_adapters",
        "active_snapshot",
        "versions_containing",
        "lineage",
        "manifest",
        "summary",
        "list_keys",
        "lookup_key",
        "deletion",
        "unfinished_deletions",
        "live_replicas",
        "replicas_behind",
        "get_job",
        "list_jobs",
        "audit_log",
    }
)
_RESTARTING = (ActorUnavailableError, RayActorError)


def _late(timeout_s: float, write: bool) -> StoreUnavailable:
    maybe = "; the change may or may not have been made" if write else ""
    return StoreUnavailable(
        f"the adapter store did not answer within serve.store_timeout_s={timeout_s:g} s"
        f"{maybe}: retry the request"
    )


def _read(
    store: Any, method: str, *args: Any, timeout_s: float = DEFAULT_STORE_TIMEOUT_S, **kwargs: Any
) -> Any:
    """A store read with a deadline: sent again across a store restart until ``timeout_s``
    has passed, then StoreUnavailable (HTTP 503). A remote error is raised as itself."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ref = getattr(store, method).options(max_task_retries=-1).remote(*args, **kwargs)
        try:
            return ray.get(ref, timeout=left)
        except GetTimeoutError:
            ray.cancel(ref)  # a read: dropping it from the store's queue is harmless
            break
        except _RESTARTING:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        except RayTaskError as exc:
            raise unwrap_remote(exc) from exc
    raise _late(timeout_s, write=False)


def _write(store: Any, method: str, timeout_s: float, *args: Any, **kwargs: Any) -> Any:
    """A store write: sent once, waited for until ``timeout_s``, never sent again."""
    ref = getattr(store, method).remote(*args, **kwargs)
    try:
        return ray.get(ref, timeout=timeout_s)
    except (GetTimeoutError, *_RESTARTING):
        raise _late(timeout_s, write=True) from None
    except RayTaskError as exc:
        raise unwrap_remote(exc) from exc


class StoreProxy:
    """The store actor's methods as synchronous calls, for code written against the registry.

    Every call has a deadline; reads (:data:`STORE_READS`) are retried within it, writes
    are not (see :func:`_read`, :func:`_write`).
    """

    def __init__(self, actor: Any, timeout_s: float = DEFAULT_STORE_TIMEOUT_S) -> None:
        self._actor = actor
        self._timeout_s = timeout_s

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle protocol probes are not store methods
            raise AttributeError(name)
        if name in STORE_READS:
            return lambda *a, **kw: _read(self._actor, name, *a, timeout_s=self._timeout_s, **kw)
        return lambda *a, **kw: _write(self._actor, name, self._timeout_s, *a, **kw)


class ModelDeployment:
    """One base model per replica; concurrent requests are batched, one row each."""

    def __init__(self, config: dict[str, Any]) -> None:
        private_process()  # it writes the model cache
        self.config = AdapterSwapConfig.model_validate(config)
        # Ray sets OMP_NUM_THREADS=floor(num_cpus) or 1 for a fractional replica; a CPU replica
        # that shares a node with a store and trainers still wants every core for its batches.
        torch.set_num_threads(self.config.serve.cpu_threads or os.cpu_count() or 1)
        store = _store_reader(self.config)
        deadline = self.config.serve.store_timeout_s
        self.replica = ModelReplica(
            self.config,
            lambda: _read(store, "active_snapshot", timeout_s=deadline),
            epoch=lambda: _read(store, "epoch", timeout_s=deadline),
        )
        self.metrics = ServeMetrics()
        self.watcher = EpochWatcher(
            self.replica.sync,
            StoreProxy(store, deadline),
            replica_id=serve.get_replica_context().replica_id.unique_id,
            poll_s=self.config.serve.epoch_poll_s,
            heartbeat_s=self.config.serve.replica_heartbeat_s,
        )
        self.generate_one.set_max_batch_size(self.config.serve.max_batch_size)
        self.generate_one.set_batch_wait_timeout_s(self.config.serve.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_one(
        self, jobs: list[InferenceJob]
    ) -> list[GenerationResult | AdapterSwapError]:
        # A job that cannot run comes back as its error, in its place: it fails alone.
        replica = self.replica
        hits, misses = replica.adapter_hits, replica.adapter_misses
        results = await asyncio.to_thread(replica.generate, jobs)
        self.metrics.record_batch(
            replica.adapter_hits - hits,
            replica.adapter_misses - misses,
            replica.last_composition_ms,
        )
        return results

    async def score(
        self, jobs: list[InferenceJob], top_logprobs: int
    ) -> list[PromptScores | AdapterSwapError]:
        return await asyncio.to_thread(self.replica.score, jobs, top_logprobs)

    async def stream(self, job: InferenceJob) -> AsyncIterator[str]:
        from adapterswap.api.model_client import LocalModelClient

        async for delta in LocalModelClient(self.replica).stream(job):
            yield delta

    def __del__(self) -> None:
        """Serve shuts the replica down: no delete should wait for it any more."""
        self.watcher.stop()


class ServeReplicaOracle:
    """The deletion barrier's ``is_alive``: is a model replica still alive, as Serve sees it?

    A replica registers in the store under ``serve.get_replica_context().replica_id.unique_id``;
    Serve's controller lists every replica of every application under the same id, in any
    state, until the replica's actor has stopped (crashed and replaced, scaled down, its
    node lost). So a replica counts as dead only once the controller no longer lists it,
    never for being slow. While the controller cannot be asked, every replica counts as
    alive: the barrier fails closed (a 503 after its timeout, the revocation in force). A
    listing serves ``ttl_s`` of barrier polls for the replicas it holds; a replica missing
    from it is looked up in a fresh one (it may have started since).
    """

    def __init__(self, ttl_s: float = 0.5, timeout_s: float = 5.0) -> None:
        self._ttl_s, self._timeout_s = ttl_s, timeout_s
        self._listed: set[str] | None = None
        self._at = -float("inf")
        self._lock = threading.Lock()

    def __call__(self, replica_id: str) -> bool:
        listed = self.replica_ids()
        if listed is not None and replica_id not in listed:
            listed = self.replica_ids(fresh=True)  # dead, or newer than the cached listing
        return listed is None or replica_id in listed

    def replica_ids(self, fresh: bool = False) -> set[str] | None:
        """Every replica id the controller lists (None: it could not be asked)."""
        with self._lock:
            if not fresh and time.monotonic() - self._at < self._ttl_s:
                return self._listed
        try:
            from ray.serve.context import _get_global_client

            controller = _get_global_client()._controller
            details = ray.get(
                controller.get_serve_instance_details.remote(), timeout=self._timeout_s
            )
            listed = {
                replica["replica_id"]
                for app in (details.get("applications") or {}).values()
                for deployment in (app.get("deployments") or {}).values()
                for replica in deployment.get("replicas") or []
            }
        except Exception:  # noqa: BLE001 - no answer: everyone counts as alive (fail closed)
            logger.warning("Serve's controller did not list replicas", exc_info=True)
            listed = None
        with self._lock:
            self._listed, self._at = listed, time.monotonic()
        return listed


# A replica that died (killed, its node lost) under a request: the request did not complete
# there, and generation and scoring are pure functions of the job, so it is sent again.
REPLICA_GONE = (RayActorError, ActorUnavailableError)
REPLICA_ATTEMPTS = 3
# Serve's own "no capacity now": queues full, or no replica running yet.
_NO_CAPACITY = (BackPressureError, DeploymentUnavailableError)


def _model_error(exc: BaseException) -> BaseException:
    """What the ingress raises for a model call's failure: the replica's own exception out of
    its Ray wrapper, or Overloaded (HTTP 503, Retry-After) for a lack of capacity."""
    if isinstance(exc, (*_NO_CAPACITY, *REPLICA_GONE)):
        return Overloaded("no model replica can take the request now; retry shortly")
    return unwrap_remote(exc)


async def _on_a_live_replica(call: Callable[[], Awaitable[Any]]) -> Any:
    for attempt in range(1, REPLICA_ATTEMPTS + 1):
        try:
            return await call()
        except REPLICA_GONE as exc:
            if attempt == REPLICA_ATTEMPTS:
                raise _model_error(exc) from exc
            logger.warning("model replica gone; retrying (%d of %d)", attempt, REPLICA_ATTEMPTS)
        except (RayTaskError, *_NO_CAPACITY) as exc:
            raise _model_error(exc) from exc
    raise AssertionError("unreachable")


class HandleModelClient:
    """The gateway's ModelClient over the model deployment's handle.

    Errors come back as the replica's own exceptions (never Ray's wrappers, whose text shows
    the replica's traceback, address and the batch's parameters), or Overloaded.
    """

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def generate(self, jobs: list[InferenceJob]) -> list[GenerationResult | AdapterSwapError]:
        # One call per job: the deployment's @serve.batch gathers them (and other callers').
        return list(
            await asyncio.gather(
                *(
                    _on_a_live_replica(lambda j=job: self.handle.generate_one.remote(j))
                    for job in jobs
                )
            )
        )

    async def score(
        self, jobs: list[InferenceJob], top_logprobs: int
    ) -> list[PromptScores | AdapterSwapError]:
        return await _on_a_live_replica(lambda: self.handle.score.remote(jobs, top_logprobs))

    async def stream(self, job: InferenceJob) -> AsyncIterator[str]:
        try:
            async for delta in self.handle.options(stream=True).stream.remote(job):
                yield delta
        except (RayTaskError, *_NO_CAPACITY, *REPLICA_GONE) as exc:
            raise _model_error(exc) from exc


@serve.ingress()
class IngressDeployment:
    """Authentication, routing and the OpenAI endpoints; the model runs elsewhere."""

    def __init__(self, model: DeploymentHandle, config: dict[str, Any]) -> None:
        private_process()  # it writes the catalog
        self.config = AdapterSwapConfig.model_validate(config)
        serving = self.config.serve
        store = _store_reader(self.config)
        deadline = serving.store_timeout_s

        def read(method: str) -> Callable[..., Any]:
            return lambda *args: _read(store, method, *args, timeout_s=deadline)

        source = StorageAdapterSource(
            StorageLayout.from_config(self.config),
            hash_base_model(self.config.model, self.config.model_cache_dir),
        )
        proxy = StoreProxy(store, deadline)
        jobs = RayJobs(self.config, proxy)
        self.gateway = Gateway(
            self.config,
            model=HandleModelClient(model),
            model_id=self.config.model.spec,
            authenticator=Authenticator(
                read("lookup_key"),
                serving.key_cache_ttl_s,
                negative_ttl_s=serving.negative_key_cache_ttl_s,
                negative_cache_size=serving.negative_key_cache_size,
                key_ids=lambda: [k.key_id for k in read("list_keys")() if not k.revoked],
            ),
            active=ActiveSet(
                read("active_snapshot"),
                lambda keep: source.forget(keep) or [],
                epoch=read("epoch"),
            ),
            stats=source.router_stats,
            embed=load_embedder(self.config.embedding).embed,
            store=proxy,
            jobs=jobs,
            on_routed=ServeMetrics().record_routing,
            # the deletion barrier drops a model replica only when Serve reports it dead
            replica_alive=ServeReplicaOracle(timeout_s=deadline),
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

    async def adapters(self, api_key: str) -> dict[str, Any]:
        principal = await self.gateway.auth.authenticate_async(f"Bearer {api_key}")
        return await asyncio.to_thread(self.gateway.list_adapters, principal)

    def __serve_build_asgi_app__(self) -> Any:
        """The FastAPI app, built on the replica after __init__ so it holds this gateway."""
        app = create_app()
        app.state.gateway = self.gateway
        return app


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``serve run`` / ``serve deploy`` (args: :class:`ServeAppArgs`)."""
    settings = ServeAppArgs.model_validate(args or {})
    config = load_config(settings.config, home=settings.home, overrides=settings.overrides)
    scaling: dict[str, Any] = (
        {"num_replicas": settings.num_replicas}
        if settings.num_replicas
        else {"autoscaling_config": settings.autoscaling or {"min_replicas": 1, "max_replicas": 1}}
    )
    resources: dict[str, Any] = {
        "num_cpus": config.ray.replica_num_cpus,
        "num_gpus": config.ray.replica_num_gpus,
    }
    if config.ray.replica_resources:
        resources["resources"] = dict(config.ray.replica_resources)
    if config.ray.max_replicas_per_node:
        scaling["max_replicas_per_node"] = config.ray.max_replicas_per_node
    # Enough requests in flight per model replica to fill two batches (one running, one forming).
    ongoing = 2 * config.serve.max_batch_size
    model = serve.deployment(
        ModelDeployment,
        name="Model",
        ray_actor_options=resources,
        max_ongoing_requests=ongoing,
        **scaling,
    )
    ingress = serve.deployment(
        IngressDeployment,
        name="Ingress",
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=256,
    )
    payload = config.model_dump()
    return ingress.bind(model.bind(payload), payload)
