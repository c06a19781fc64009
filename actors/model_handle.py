"""The gateway's model client over a Serve handle to the model deployment.

A model call's failure comes back as the replica's own exception (never Ray's wrappers,
whose text shows the replica's traceback, address and the batch's parameters), or as
Overloaded (HTTP 503, Retry-After) when no replica can take the request; a call whose
replica died under it is sent again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from adapterswap.api.model_client import StreamItem
from adapterswap.engine.replica import InferenceJob
from adapterswap.engine.requests import GenerationResult, PromptScores
from adapterswap.errors import AdapterSwapError, Overloaded, unwrap_remote

logger = logging.getLogger("adapterswap.serve")


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

    async def stream(self, job: InferenceJob) -> AsyncIterator[StreamItem]:
        try:
            async for item in self.handle.options(stream=True).stream.remote(job):
                yield item
        except (RayTaskError, *_NO_CAPACITY, *REPLICA_GONE) as exc:
            raise _model_error(exc) from exc
