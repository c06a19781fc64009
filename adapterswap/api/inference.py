"""The inference half of the gateway: route a request, call the model, answer. No Ray here.

Isolation: every candidate the router sees, every adapter an explicit list may name and
every adapter a response reports comes from ``ActiveSet.visible(groups)`` /
``ActiveSet.resolve(id, groups)`` with the groups of the caller's key (narrowed by the
request's ``groups``), never from the request alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from adapterswap.api import openai_format as fmt
from adapterswap.api.auth import effective_groups
from adapterswap.api.model_client import ModelClient
from adapterswap.api.schemas import ChatRequest, CompletionRequest, _InferenceBody
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.replica import InferenceJob
from adapterswap.engine.requests import PromptScores, SamplingParams
from adapterswap.errors import InvalidArgument, PayloadTooLarge, StaleMixture, unwrap_remote
from adapterswap.route.active_set import ActiveSet
from adapterswap.route.router import Candidate, RoutingDecision, route, routing_texts
from adapterswap.route.stats import ShardStats
from adapterswap.types import Embed, Mixture, Principal

logger = logging.getLogger("adapterswap.requests")
# A request routed to a version that a delete revoked before it ran is routed again, once:
# the second routing syncs with the store first, so it sees the new set.
REROUTES = 1


class InferenceEndpoints:
    """``/v1/completions``, ``/v1/chat/completions``, ``/v1/adapters``, ``/v1/models``.

    A part of :class:`~adapterswap.api.gateway.Gateway`, which sets these attributes.
    """

    config: AdapterSwapConfig
    model: ModelClient
    model_id: str
    active: ActiveSet
    _stats: Callable[[Any], ShardStats]
    _embed: Embed
    _on_routed: Callable[[float, int], None] | None

    # -- routing ----------------------------------------------------------------------

    def _route(
        self, principal: Principal, body: _InferenceBody, texts: list[str]
    ) -> tuple[Mixture, dict[str, Any]]:
        """The request's mixture and the response's ``adapterswap`` block."""
        self.active.sync()
        groups = effective_groups(principal, body.groups)
        if body.adapters == "none":
            return (), {"adapters": [], "router": {"reason": "adapters: none"}}
        if isinstance(body.adapters, list):
            chosen = [(self.active.resolve(a.id, groups), a.weight) for a in body.adapters]
            mixture = tuple((v.ref, w) for v, w in chosen if w > 0)
            listed = [fmt.describe_adapter(v.ref, v.group, w) for v, w in chosen]
            return mixture, {"adapters": listed, "router": {"reason": "adapters given"}}
        started = time.perf_counter()
        decision = self._decide(groups, texts, body.top_k)
        if self._on_routed is not None:
            self._on_routed(1000 * (time.perf_counter() - started), len(decision.adapters))
        mixture = tuple((a.ref, a.weight) for a in decision.adapters)
        listed = [fmt.describe_adapter(a.ref, a.group, a.weight) for a in decision.adapters]
        return mixture, {"adapters": listed, "router": decision.as_dict()}

    def _decide(
        self, groups: Sequence[str], texts: list[str], top_k: int | None
    ) -> RoutingDecision:
        candidates = [Candidate(v, self._stats(v.ref)) for v in self.active.visible(groups)]
        decision = RoutingDecision((), "nothing to route on", len(candidates), None)
        for text in texts:
            decision = route(self._embed([text])[0], candidates, self.config.router, top_k=top_k)
            if decision.adapters or decision.reason != "nothing relevant":
                break
        return decision

    # -- inference ----------------------------------------------------------------------

    def _params(self, body: _InferenceBody) -> SamplingParams:
        limit = self.config.serve.max_new_tokens
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens > limit:
            raise PayloadTooLarge(f"max_tokens: {max_tokens} is over serve.max_new_tokens={limit}")
        if isinstance(body, CompletionRequest):
            logprobs = body.logprobs
        else:  # chat: a flag, and how many alternatives
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.stream and logprobs is not None:
            raise InvalidArgument("logprobs: not supported with stream; ask without streaming")
        return SamplingParams(
            max_tokens,
            body.temperature,
            body.top_p,
            body.seed,
            tuple(body.stop or ()),
            body.ignore_eos,
            logprobs,
        )

    def completion_jobs(
        self, principal: Principal, body: CompletionRequest
    ) -> tuple[list[InferenceJob], dict[str, Any]]:
        """One job per prompt; all prompts of a request share its routing (on the first)."""
        mixture, info = self._route(principal, body, body.prompts[:1])
        params = self._params(body)
        return [InferenceJob(prompt=p, params=params, mixture=mixture) for p in body.prompts], info

    def chat_job(
        self, principal: Principal, body: ChatRequest
    ) -> tuple[InferenceJob, dict[str, Any]]:
        messages = tuple(m.model_dump(exclude_none=True, exclude={"name"}) for m in body.messages)
        mixture, info = self._route(principal, body, routing_texts(messages))
        return InferenceJob(messages=messages, params=self._params(body), mixture=mixture), info

    async def complete(self, principal: Principal, body: CompletionRequest) -> dict[str, Any]:
        """``POST /v1/completions`` without streaming."""
        started = time.perf_counter()
        for attempt in range(REROUTES + 1):
            # Routing reads the store and embeds the query: off the event loop, so concurrent
            # requests reach the model deployment together and share a batch.
            jobs, info = await asyncio.to_thread(self.completion_jobs, principal, body)
            try:
                scores: list[PromptScores | None] = [None] * len(jobs)
                if body.echo:
                    scores = _unwrap(await self.model.score(jobs, body.logprobs or 0))
                results = (
                    _unwrap(await self.model.generate(jobs))
                    if any(j.params.max_tokens for j in jobs)
                    else [None] * len(jobs)
                )
                break
            except StaleMixture:
                if attempt == REROUTES:
                    raise
        choices = [
            fmt.completion_choice(i, body, s, r)
            for i, (s, r) in enumerate(zip(scores, results, strict=True))
        ]
        usage = fmt.usage(results, scores)
        log_request("completions", principal, info, started, usage)
        return {
            **fmt.envelope("text_completion", self.model_id),
            "choices": choices,
            "usage": usage,
            "adapterswap": info,
        }

    async def chat(self, principal: Principal, body: ChatRequest) -> dict[str, Any]:
        """``POST /v1/chat/completions`` without streaming."""
        started = time.perf_counter()
        for attempt in range(REROUTES + 1):
            job, info = await asyncio.to_thread(self.chat_job, principal, body)
            try:
                (result,) = _unwrap(await self.model.generate([job]))
                break
            except StaleMixture:
                if attempt == REROUTES:
                    raise
        usage = fmt.usage([result], [None])
        log_request("chat", principal, info, started, usage)
        return {
            **fmt.envelope("chat.completion", self.model_id),
            "choices": [fmt.chat_choice(result, body.logprobs)],
            "usage": usage,
            "adapterswap": info,
        }

    async def stream_chunks(
        self, job: InferenceJob, info: dict[str, Any], chat: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Streaming chunks in OpenAI's shape; the first carries the ``adapterswap`` block."""
        head = fmt.envelope("chat.completion.chunk" if chat else "text_completion", self.model_id)
        first = True
        async for delta in self.model.stream(job):
            chunk = fmt.stream_chunk(head, delta, chat)
            if first:
                chunk["adapterswap"] = info
                first = False
            yield chunk
        yield fmt.last_chunk(head, chat) | ({"adapterswap": info} if first else {})

    def list_adapters(self, principal: Principal) -> dict[str, Any]:
        """``GET /v1/adapters``: only what the caller's groups may see."""
        self.active.sync()
        data = [
            {
                "id": v.adapter_id,
                "version": v.version,
                "group": v.group,
                "shard": v.shard,
                "doc_count": v.doc_count,
                "created_at": v.created_at,
                "status": v.status,
            }
            for v in self.active.visible(principal.groups)
        ]
        return {"object": "list", "data": data}

    def list_models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one base model."""
        return {
            "object": "list",
            "data": [
                {"id": self.model_id, "object": "model", "created": 0, "owned_by": "adapterswap"}
            ],
        }


def _unwrap(items: Sequence[Any]) -> list[Any]:
    """A model client's per-job results, raising the first job's error among them.

    The error is raised as the exception itself, out of any Ray wrapper, whose text would
    show the replica's traceback, address and the batch's parameters.
    """
    for item in items:
        if isinstance(item, Exception):
            raise unwrap_remote(item)
    return list(items)


def log_request(
    endpoint: str, principal: Principal, info: dict[str, Any], started: float, usage: dict[str, int]
) -> None:
    """One structured line per request: who, which adapter versions, how long. Never the text."""
    adapters = [f"{a['id']}@v{a['version']}" for a in info["adapters"]]
    line = {
        "endpoint": endpoint,
        "user": principal.user,
        "adapters": adapters,
        "ms": round(1000 * (time.perf_counter() - started), 1),
        **usage,
    }
    logger.info(json.dumps(line))
