"""The inference half of the gateway: route a request, call the model, answer. No Ray here.

Isolation: every candidate the router sees, every adapter an explicit list may name and
every adapter a response reports comes from ``ActiveSet.visible(groups)`` /
``ActiveSet.resolve(id, groups)`` with the groups of the caller's key (narrowed by the
request's ``groups``), never from the request alone.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

from adapterswap.api import openai_format as fmt
from adapterswap.api.auth import effective_groups
from adapterswap.api.model_client import ModelClient
from adapterswap.api.schemas import MAX_PAGE, ChatRequest, CompletionRequest, _InferenceBody
from adapterswap.api.tokenizer import check_vocabulary
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.replica import InferenceJob
from adapterswap.engine.requests import GenerationResult, PromptScores, SamplingParams
from adapterswap.errors import (
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    StaleMixture,
    unwrap_remote,
)
from adapterswap.route.active_set import ActiveSet
from adapterswap.route.index import RoutingIndex
from adapterswap.route.router import RoutingDecision, decide, routing_texts
from adapterswap.types import AdapterVersion, Embed, Mixture, Principal

logger = logging.getLogger("adapterswap.requests")
# A request routed to a version that a delete revoked before it ran is routed again, once:
# the second routing syncs with the store first, so it sees the new set.
REROUTES = 1
# The name that, besides the served base model's, lets the router decide (``model`` field).
SERVED_NAME = "adapterswap"


class InferenceEndpoints:
    """``/v1/completions``, ``/v1/chat/completions``, ``/v1/adapters``, ``/v1/models``.

    A part of :class:`~adapterswap.api.gateway.Gateway`, which sets these attributes.
    """

    config: AdapterSwapConfig
    model: ModelClient
    model_id: str
    tokenizer: Any
    active: ActiveSet
    index: RoutingIndex
    _embed: Embed
    _on_routed: Callable[[float, float, int], None] | None

    # -- routing ----------------------------------------------------------------------

    def _route_each(
        self, principal: Principal, body: _InferenceBody, queries: list[list[str]]
    ) -> list[tuple[Mixture, dict[str, Any]]]:
        """Each job's mixture and the ``adapterswap`` block of its answer.

        ``queries[i]`` is what job ``i`` is routed on: texts in order of preference. Each job
        is routed on its own (a list of prompts may get several mixtures), and each text is
        embedded alone, so a job's routing, and so its answer, never depends on the others.
        """
        self.active.sync()
        groups = effective_groups(principal, body.groups)
        named = self._named_mixture(body, groups)
        if named is not None:
            return [named] * len(queries)
        routed = []
        for texts in queries:
            started = time.perf_counter()
            decision, scoring_s = self._decide(groups, texts, body.top_k)
            if self._on_routed is not None:
                total_ms = 1000 * (time.perf_counter() - started)
                self._on_routed(total_ms, 1000 * scoring_s, len(decision.adapters))
            mixture = tuple((a.ref, a.weight) for a in decision.adapters)
            listed = [fmt.describe_adapter(a.ref, a.group, a.weight) for a in decision.adapters]
            routed.append((mixture, {"adapters": listed, "router": decision.as_dict()}))
        return routed

    def _named_mixture(
        self, body: _InferenceBody, groups: Sequence[str]
    ) -> tuple[Mixture, dict[str, Any]] | None:
        """The mixture the request names (``model`` an adapter id, or ``adapters`` "none" or
        a list), with its ``adapterswap`` block; None when the router decides."""
        adapter = self._model_adapter(body.model, groups)
        if adapter is not None:
            if body.adapters != "auto":
                raise InvalidArgument(
                    f"adapters: model already names adapter {body.model!r}; leave adapters out "
                    f"(or set model to {self.model_id!r} to choose adapters with this field)"
                )
            listed = [fmt.describe_adapter(adapter.ref, adapter.group, 1.0)]
            return ((adapter.ref, 1.0),), {"adapters": listed, "router": {"reason": "model"}}
        if body.adapters == "none":
            return (), {"adapters": [], "router": {"reason": "adapters: none"}}
        if isinstance(body.adapters, list):
            chosen = [(self.active.resolve(a.id, groups), a.weight) for a in body.adapters]
            mixture = tuple((v.ref, w) for v, w in chosen if w > 0)
            listed = [fmt.describe_adapter(v.ref, v.group, w) for v, w in chosen]
            return mixture, {"adapters": listed, "router": {"reason": "adapters given"}}
        return None

    def _model_adapter(self, model: str | None, groups: Sequence[str]) -> AdapterVersion | None:
        """The adapter ``model`` names, as vLLM's ``model`` names a LoRA module; None for the
        base model (its name, ``adapterswap``, or no ``model``). An adapter of another group
        answers exactly like an id that does not exist."""
        if model is None or model in (self.model_id, SERVED_NAME):
            return None
        try:
            return self.active.resolve(model, groups)
        except NotFound:
            raise NotFound(
                f"model {model!r} not found; GET /v1/models lists the models this key may use"
            ) from None

    def _decide(
        self, groups: Sequence[str], texts: list[str], top_k: int | None
    ) -> tuple[RoutingDecision, float]:
        """The decision, and the seconds spent scoring and deciding (not embedding, and not
        reading statistics a version's first routing needs)."""
        visible = self.active.visible(groups)  # the caller's groups, before any score
        self.index.add(visible)
        decision = RoutingDecision((), "nothing to route on", len(visible), None)
        scoring = 0.0
        for text in texts:
            query = self._embed([text])[0]
            started = time.perf_counter()
            versions, scores = self.index.score(query, visible)
            decision = decide(versions, scores, self.config.router, top_k=top_k)
            scoring += time.perf_counter() - started
            if decision.adapters or decision.reason != "nothing relevant":
                break
        return decision, scoring

    # -- inference ----------------------------------------------------------------------

    def _params(self, body: _InferenceBody) -> SamplingParams:
        limit = self.config.serve.max_new_tokens
        field, max_tokens = "max_tokens", body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            field, max_tokens = "max_completion_tokens", body.max_completion_tokens
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, none for chat
            max_tokens = limit if isinstance(body, ChatRequest) else 16
        if max_tokens > limit:
            raise PayloadTooLarge(f"{field}: {max_tokens} is over serve.max_new_tokens={limit}")
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
    ) -> tuple[list[InferenceJob], list[dict[str, Any]]]:
        """One job per prompt, each routed on its own text, with its ``adapterswap`` block."""
        params = self._params(body)
        texts = [
            p if isinstance(p, str) else self._prompt_text(p, i) for i, p in enumerate(body.prompts)
        ]
        routed = self._route_each(principal, body, [[t] for t in texts])
        jobs = [
            InferenceJob(prompt=p, params=params, mixture=mixture)
            if isinstance(p, str)
            else InferenceJob(token_ids=tuple(p), params=params, mixture=mixture)
            for p, (mixture, _) in zip(body.prompts, routed, strict=True)
        ]
        return jobs, [info for _, info in routed]

    def _prompt_text(self, token_ids: list[int], index: int) -> str:
        """The text of a token-id prompt, to route on; a 400 for an id outside the vocabulary."""
        check_vocabulary(self.tokenizer, token_ids, f"prompt: item {index}, token {{}}")
        return self.tokenizer.decode(token_ids)

    def chat_job(
        self, principal: Principal, body: ChatRequest
    ) -> tuple[InferenceJob, dict[str, Any]]:
        messages = tuple(m.template_message() for m in body.messages)
        ((mixture, info),) = self._route_each(principal, body, [routing_texts(messages)])
        return InferenceJob(messages=messages, params=self._params(body), mixture=mixture), info

    async def complete(self, principal: Principal, body: CompletionRequest) -> dict[str, Any]:
        """``POST /v1/completions`` without streaming."""
        started = time.perf_counter()
        for attempt in range(REROUTES + 1):
            # Routing reads the store and embeds the query: off the event loop, so concurrent
            # requests reach the model deployment together and share a batch.
            jobs, infos = await asyncio.to_thread(self.completion_jobs, principal, body)
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
            fmt.completion_choice(i, body, s, r) | {"adapterswap": info}
            for i, (s, r, info) in enumerate(zip(scores, results, infos, strict=True))
        ]
        usage = fmt.usage(results, scores)
        log_request("completions", principal, infos, started, usage, results)
        # One prompt: its block at the top too, where it always was.
        single = {"adapterswap": infos[0]} if len(infos) == 1 else {}
        return {
            **fmt.envelope("text_completion", self.model_id),
            "choices": choices,
            "usage": usage,
            **single,
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
        log_request("chat", principal, [info], started, usage, [result])
        return {
            **fmt.envelope("chat.completion", self.model_id),
            "choices": [fmt.chat_choice(result, body.logprobs)],
            "usage": usage,
            "adapterswap": info,
        }

    async def stream_chunks(
        self,
        principal: Principal,
        job: InferenceJob,
        info: dict[str, Any],
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[dict[str, Any]]:
        """Streaming chunks in OpenAI's shape: a chat stream's first names the role (as
        vLLM's), the first carries the ``adapterswap`` block, the last the finish reason of
        the answer without streaming; with ``include_usage`` every chunk has ``usage: null``
        and one more, with no choices, the usage. A finished stream logs its request line."""
        started = time.perf_counter()
        head = fmt.envelope("chat.completion.chunk" if chat else "text_completion", self.model_id)
        usage: dict[str, Any] = {"usage": None} if include_usage else {}
        first = {"adapterswap": info}  # on the first chunk only
        if chat:
            yield fmt.role_chunk(head) | usage | first
            first = {}
        async for item in self.model.stream(job):
            if isinstance(item, str):
                yield fmt.stream_chunk(head, item, chat) | usage | first
                first = {}
            else:
                result = item
        yield fmt.last_chunk(head, chat, result.finish_reason) | usage | first
        counts = fmt.usage([result], [None])
        if include_usage:
            yield fmt.usage_chunk(head, counts)
        log_request("chat" if chat else "completions", principal, [info], started, counts, [result])

    def list_adapters(
        self, principal: Principal, limit: int = 100, after: str | None = None
    ) -> dict[str, Any]:
        """``GET /v1/adapters``: one page of what the caller's groups may see, in id order.

        ``after`` is a pure cursor: the page starts at the first visible id above it, whether
        or not the caller may see ``after`` itself, so an id of another group tells nothing.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit: must be 1 to {MAX_PAGE}, got {limit}")
        self.active.sync()
        visible = self.active.visible(principal.groups)  # sorted by id
        start = 0 if after is None else bisect.bisect_right([v.adapter_id for v in visible], after)
        page = visible[start : start + limit]
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
            for v in page
        ]
        return {
            "object": "list",
            "data": data,
            "first_id": page[0].adapter_id if page else None,
            "last_id": page[-1].adapter_id if page else None,
            "has_more": start + limit < len(visible),
        }

    def list_models(self, principal: Principal) -> dict[str, Any]:
        """``GET /v1/models``: the base model, then every adapter the caller may see, as vLLM
        lists its LoRA modules (``model`` may name any of them)."""
        self.active.sync()
        base = {"id": self.model_id, "root": self.model_id, "parent": None, "created": 0}
        adapters = [
            {
                "id": v.adapter_id,
                "root": v.adapter_id,
                "parent": self.model_id,
                "created": int(datetime.fromisoformat(v.created_at).timestamp()),
            }
            for v in self.active.visible(principal.groups)
        ]
        return {
            "object": "list",
            "data": [
                {"object": "model", "owned_by": "adapterswap", **m} for m in [base, *adapters]
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
    endpoint: str,
    principal: Principal,
    infos: Sequence[dict[str, Any]],
    started: float,
    usage: dict[str, int],
    results: Sequence[GenerationResult | None] = (),
) -> None:
    """One structured line per request: who, which adapter versions (of all its prompts), how
    long, and how much of it waited in the model replica's queue and before the first token
    (the slowest of its prompts). Never the text."""
    adapters = sorted({f"{a['id']}@v{a['version']}" for info in infos for a in info["adapters"]})
    line = {
        "endpoint": endpoint,
        "user": principal.user,
        "adapters": adapters,
        "ms": round(1000 * (time.perf_counter() - started), 1),
        **usage,
    }
    timed = [r for r in results if r is not None and r.queue_s is not None]
    if timed:
        line["queue_ms"] = round(1000 * max(r.queue_s or 0.0 for r in timed), 1)
        line["ttft_ms"] = round(1000 * max(r.first_token_s or 0.0 for r in timed), 1)
    logger.info(json.dumps(line))
