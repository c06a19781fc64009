"""How the gateway reaches model replicas: the :class:`ModelClient` protocol, and
:class:`LocalModelClient` over a replica in this process.

The local client serves tests and single-process serving; the Ray Serve ingress uses a
handle-backed client (``actors.model_handle.HandleModelClient``). Each job is submitted to
the replica's engine (off the event loop: checking it may read the store) and awaited; a
stream's text deltas cross back to the event loop through a queue, and a caller that goes
away (a cancelled task, a closed stream) cancels its row in the engine.

A stream yields the job's text deltas as they come, then its :class:`GenerationResult`
(finish reason, token counts), so that a stream's last chunk and usage say what the same
request without streaming would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from adapterswap.engine.loop import Work
from adapterswap.engine.replica import InferenceJob, ModelReplica
from adapterswap.engine.requests import GenerationResult, PromptScores
from adapterswap.errors import AdapterSwapError

# What a stream yields: text deltas, then the job's result, last.
StreamItem = str | GenerationResult


class ModelClient(Protocol):
    """How the gateway reaches model replicas (locally, or through a Serve handle)."""

    async def generate(self, jobs: list[InferenceJob]) -> list[GenerationResult | AdapterSwapError]:
        """One result per job, or that job's error (see ``ModelReplica.generate``)."""

    async def score(
        self, jobs: list[InferenceJob], top_logprobs: int
    ) -> list[PromptScores | AdapterSwapError]: ...

    def stream(self, job: InferenceJob) -> AsyncIterator[StreamItem]:
        """The job's text deltas, then its :class:`GenerationResult`; its error is raised."""


class LocalModelClient:
    """Submits jobs to a :class:`ModelReplica`'s engine in this process."""

    def __init__(self, replica: ModelReplica) -> None:
        self.replica = replica

    async def generate(self, jobs: list[InferenceJob]) -> list[GenerationResult | AdapterSwapError]:
        return list(await asyncio.gather(*(self._one(job, None) for job in jobs)))

    async def score(
        self, jobs: list[InferenceJob], top_logprobs: int
    ) -> list[PromptScores | AdapterSwapError]:
        return list(await asyncio.gather(*(self._one(job, top_logprobs) for job in jobs)))

    async def _one(self, job: InferenceJob, score: int | None) -> Any:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Any] = loop.create_future()

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(_resolve, outcome, result)

        work = await asyncio.to_thread(self.replica.submit, job, done, score=score)
        try:
            return await outcome
        finally:
            if work is not None and not outcome.done():  # the caller went away
                self._cancel(work)

    async def stream(self, job: InferenceJob) -> AsyncIterator[StreamItem]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        work = await asyncio.to_thread(self.replica.submit, job, put, on_token=put)
        item: Any = None
        try:
            while isinstance(item := await queue.get(), str):
                yield item
        finally:
            if work is not None and isinstance(item, str | None):  # the client went away
                self._cancel(work)
        if isinstance(item, Exception):  # the job was refused, or failed while it ran
            raise item
        yield item

    def _cancel(self, work: Work) -> None:
        work.cancel()
        self.replica.engine.wake()


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)
