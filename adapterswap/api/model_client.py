"""How the gateway reaches model replicas: the :class:`ModelClient` protocol, and
:class:`LocalModelClient` over a replica in this process.

The local client serves tests and single-process serving; the Ray Serve ingress uses a
handle-backed client (``actors.model_handle.HandleModelClient``). The replica's work is
blocking, so it runs in a worker thread, and streamed text deltas cross back to the event
loop through a queue.

A stream yields the job's text deltas as they come, then its :class:`GenerationResult`
(finish reason, token counts), so that a stream's last chunk and usage say what the same
request without streaming would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

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
    """Calls a :class:`ModelReplica` directly, off the event loop."""

    def __init__(self, replica: ModelReplica) -> None:
        self.replica = replica

    async def generate(self, jobs: list[InferenceJob]) -> list[GenerationResult | AdapterSwapError]:
        return await asyncio.to_thread(self.replica.generate, jobs)

    async def score(
        self, jobs: list[InferenceJob], top_logprobs: int
    ) -> list[PromptScores | AdapterSwapError]:
        return await asyncio.to_thread(self.replica.score, jobs, top_logprobs)

    async def stream(self, job: InferenceJob) -> AsyncIterator[StreamItem]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | GenerationResult | Exception] = asyncio.Queue()

        def produce() -> None:
            try:
                (result,) = self.replica.generate(
                    [job],
                    on_token=lambda _i, delta: loop.call_soon_threadsafe(queue.put_nowait, delta),
                )
            except Exception as exc:  # noqa: BLE001 - re-raised on the consumer side
                result = exc
            loop.call_soon_threadsafe(queue.put_nowait, result)  # a result, or why none

        worker = loop.run_in_executor(None, produce)
        while isinstance(item := await queue.get(), str):
            yield item
        await worker
        if isinstance(item, Exception):  # the job was refused, or its batch failed
            raise item
        yield item
