"""The ingress logic: authenticate, route, call the model, shape OpenAI responses. No Ray here.

The FastAPI app (``http_app.py``) is a thin layer over :class:`Gateway`; the Ray Serve
ingress deployment builds a Gateway whose collaborators are Ray handles, and tests build
one over a local :class:`~adapterswap.engine.replica.ModelReplica` and a registry.

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
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import pyarrow.compute as pc

from adapterswap.api.auth import Authenticator, effective_groups, require_admin
from adapterswap.api.schemas import ChatRequest, CompletionRequest, DocumentsRequest, _InferenceBody
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_lock, ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import AdapterSwapConfig
from adapterswap.delete.job import DeleteRequest, request_delete, wait_for_replicas
from adapterswap.engine.replica import InferenceJob, Mixture
from adapterswap.engine.requests import GenerationResult, PromptScores, SamplingParams
from adapterswap.errors import (
    AdapterSwapError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    StaleMixture,
    unwrap_remote,
)
from adapterswap.jobs import Jobs
from adapterswap.route.active_set import ActiveSet
from adapterswap.route.router import Candidate, RoutingDecision, route, routing_texts
from adapterswap.route.stats import ShardStats
from adapterswap.store.keys import Principal
from adapterswap.store.registry import AdapterRef, DeletionState, covers_row

logger = logging.getLogger("adapterswap.requests")
# A request routed to a version that a delete revoked before it ran is routed again, once:
# the second routing syncs with the store first, so it sees the new set.
REROUTES = 1


class ModelClient(Protocol):
    """How the gateway reaches model replicas (locally, or through a Serve handle)."""

    async def generate(self, jobs: list[InferenceJob]) -> list[GenerationResult | AdapterSwapError]:
        """One result per job, or that job's error (see ``ModelReplica.generate``)."""

    async def score(
        self, jobs: list[InferenceJob], top_logprobs: int
    ) -> list[PromptScores | AdapterSwapError]: ...

    def stream(self, job: InferenceJob) -> AsyncIterator[str]: ...


class Gateway:
    """Everything the HTTP endpoints do, given its collaborators."""

    def __init__(
        self,
        config: AdapterSwapConfig,
        *,
        model: ModelClient,
        model_id: str,
        authenticator: Authenticator,
        active: ActiveSet,
        stats: Callable[[Any], ShardStats],
        embed: Callable[[Sequence[str]], np.ndarray],
        store: Any,
        jobs: Jobs,
        on_routed: Callable[[float, int], None] | None = None,
        replica_alive: Callable[[str], bool] | None = None,
    ) -> None:
        """``store`` answers the registry's methods synchronously (a registry or an actor proxy).

        ``replica_alive`` is the deletion barrier's oracle: is this registered model replica
        still alive? The Ray Serve ingress passes one that asks Serve's controller. None:
        every registered replica counts until it unregisters (one process, tests), so a
        replica is never dropped for being slow.
        """
        self.config = config
        self.model = model
        self.model_id = model_id
        self.auth = authenticator
        self.active = active
        self._stats = stats
        self._embed = embed
        self.store = store
        self.jobs = jobs
        self._on_routed = on_routed  # (milliseconds, adapters): metrics, when served by Ray
        self.replica_alive = replica_alive

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
            listed = [_describe(v.ref, v.group, w) for v, w in chosen]
            return mixture, {"adapters": listed, "router": {"reason": "adapters given"}}
        started = time.perf_counter()
        decision = self._decide(groups, texts, body.top_k)
        if self._on_routed is not None:
            self._on_routed(1000 * (time.perf_counter() - started), len(decision.adapters))
        mixture = tuple((a.ref, a.weight) for a in decision.adapters)
        listed = [_describe(a.ref, a.group, a.weight) for a in decision.adapters]
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
            _completion_choice(i, body, s, r)
            for i, (s, r) in enumerate(zip(scores, results, strict=True))
        ]
        usage = _usage(results, scores)
        log_request("completions", principal, info, started, usage)
        return {
            **_envelope("text_completion", self.model_id),
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
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
            "logprobs": _chat_logprobs(result.scores) if body.logprobs else None,
        }
        usage = _usage([result], [None])
        log_request("chat", principal, info, started, usage)
        return {
            **_envelope("chat.completion", self.model_id),
            "choices": [choice],
            "usage": usage,
            "adapterswap": info,
        }

    async def stream_chunks(
        self, job: InferenceJob, info: dict[str, Any], chat: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Streaming chunks in OpenAI's shape; the first carries the ``adapterswap`` block."""
        envelope = _envelope("chat.completion.chunk" if chat else "text_completion", self.model_id)
        first = True
        async for delta in self.model.stream(job):
            piece = {"delta": {"content": delta}} if chat else {"text": delta}
            chunk = {**envelope, "choices": [{"index": 0, **piece, "finish_reason": None}]}
            if first:
                chunk["adapterswap"] = info
                first = False
            yield chunk
        done = {"delta": {}} if chat else {"text": ""}
        yield {
            **envelope,
            "choices": [{"index": 0, **done, "finish_reason": "stop"}],
            **({"adapterswap": info} if first else {}),
        }

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

    # -- knowledge management (admin) -------------------------------------------------------

    def ingest(self, principal: Principal, body: DocumentsRequest) -> dict[str, Any]:
        """``POST /v1/documents``: validated as a whole, like ``adapterswap ingest``.

        With ``replace: true`` an id that exists is a delete plus an ingest. Every field is
        validated and the new catalog fragment built first, so a bad body changes nothing.
        Then, under the ingest lock, every version holding the id is revoked, the old row
        removed (its deletion recorded ``removed``) and the new one written; the answer comes
        once every replica has dropped the revoked versions (503 if one does not in time:
        replaced, with the revocation in force). The delete job retrains and purges.
        """
        require_admin(principal)
        actor = f"api:{principal.user}"
        records = [
            RawRecord(f"documents[{i}]", d.model_dump(exclude_none=True))
            for i, d in enumerate(body.documents)
        ]
        deleted: list[DeleteRequest] = []

        def replace(doc_ids: list[str]) -> None:  # called under the ingest lock
            catalog = Catalog(self.config.storage)
            request = request_delete(self.store, catalog, doc_ids, self.jobs.runner, actor)
            deleted.append(request)
            # Only the contents recorded now go; the deletions say so at once, so the job's
            # removal never matches the replacement, even one with the very same text.
            catalog.remove(doc_ids, {d: request.held.get(d, []) for d in doc_ids})
            removed = [
                r for r in request.records if r.content_hash in request.held.get(r.doc_id, [])
            ]
            self.store.advance_deletion(removed, DeletionState.REMOVED, actor=actor)

        try:
            result = ingest_records(
                records,
                self.config,
                embed=self._embed,
                audit=self.store,
                actor=actor,
                replace=replace if body.replace else None,
            )
            if deleted:
                self._wait_for_replicas(deleted[0].epoch)
        finally:  # the job runs whatever happened after the revocation: it stands
            if deleted and deleted[0].job is not None:
                self.jobs.start_deletion(deleted[0].job)
        answer: dict[str, Any] = {
            "accepted": result.accepted,
            "batch": result.batch,
            "shards": [p.shard for p in result.shards],
        }
        if deleted:
            answer |= {
                "replaced": result.replaced,
                "revoked": deleted[0].revoked,
                "job": deleted[0].job_id,
            }
        return answer

    def _wait_for_replicas(self, epoch: int) -> float:
        """The deletion barrier, after syncing the ingress's own view.

        Returns once every live model replica acknowledged ``epoch``: it evicted the revoked
        versions and stopped every generation in flight that used them, so no token is
        produced with a revoked version after this returns. A live replica that does not
        acknowledge in time raises RevocationTimeout (503); the revocation stays in force.
        """
        self.active.sync()
        return wait_for_replicas(
            self.store,
            epoch,
            timeout_s=self.config.serve.revocation_timeout_s,
            is_alive=self.replica_alive,
        )

    def document(self, principal: Principal, doc_id: str) -> dict[str, Any]:
        """``GET /v1/documents/{id}``: metadata, placement and the versions that saw it."""
        require_admin(principal)
        rows = (
            Catalog(self.config.storage)
            .read(
                ["id", "group", "batch", "shard", "content_hash", "ingested_at", "metadata"],
                filter=pc.field("id") == doc_id,
            )
            .to_pylist()
        )
        if not rows:
            raise NotFound(f"document {doc_id!r} not found")
        row = rows[0]
        versions = [
            {"id": v.adapter_id, "version": v.version, "status": v.status}
            for v in self.store.versions_containing(doc_id)
        ]
        unfinished = [d for d in self.store.deletions(doc_id) if d.state != DeletionState.PURGED]
        deletions = [
            {"content_hash": d.content_hash, "state": d.state.value, "job": d.job_id}
            for d in unfinished
        ]
        covered = any(covers_row(d, row["content_hash"]) for d in unfinished)
        row["metadata"] = json.loads(row["metadata"])
        row["ingested_at"] = row["ingested_at"].isoformat()
        status = "deleting" if covered else "active"
        return {**row, "status": status, "adapters": versions, "deletions": deletions}

    def delete_document(self, principal: Principal, doc_id: str) -> dict[str, Any]:
        """``DELETE /v1/documents/{id}``: answers once every live replica dropped its versions.

        Every version holding the id is revoked, whatever earlier deletions or replacements
        of it are unfinished, and whatever content the catalog holds for it is deleted, so a
        200 always means the document is going for good. Retraining and purging go on in the
        returned job (a repeat answers the job carrying the deletion on: a new one if the old
        ended unfinished). An unknown id, or one whose deletions have all finished, is a 404.
        """
        require_admin(principal)
        request = request_delete(
            self.store,
            Catalog(self.config.storage),
            [doc_id],
            self.jobs.runner,
            f"api:{principal.user}",
            lock=lambda: ingest_lock(self.store),  # no replacement lands between read and revoke
        )
        try:
            waited = self._wait_for_replicas(request.epoch)
        finally:  # the job runs even when the barrier times out: the revocation stands
            if request.job is not None:
                self.jobs.start_deletion(request.job)
        return {
            "revoked": request.revoked,
            "job": request.job_id,
            "acknowledged_after_s": round(waited, 3),
        }

    def submit_training(self, principal: Principal) -> dict[str, Any]:
        """``POST /v1/train``: a job that trains every shard whose content changed."""
        require_admin(principal)
        job = self.jobs.submit_training(principal.user)
        return {"job": job.job_id, "state": job.state.value}

    def job(self, principal: Principal, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: state, progress, result and error of a job."""
        require_admin(principal)
        job = self.jobs.get(job_id)
        return {
            "id": job.job_id,
            "object": "job",
            "kind": job.kind,
            "state": job.state.value,
            "submitted_by": job.actor,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "progress": job.progress,
            "result": job.result,
            "error": job.error,
        }

    def audit(self, principal: Principal, since: int, limit: int) -> dict[str, Any]:
        """``GET /v1/audit``: the append-only log, oldest first, after ``since``."""
        require_admin(principal)
        entries = self.store.audit_log(since, min(max(limit, 1), 1000))
        return {"object": "list", "data": [asdict(e) for e in entries]}

    def list_models(self) -> dict[str, Any]:
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


def _describe(ref: AdapterRef, group: str, weight: float) -> dict[str, Any]:
    return {"id": ref.id, "version": ref.version, "group": group, "weight": weight}


def _envelope(kind: str, model_id: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


def _completion_choice(
    index: int,
    body: CompletionRequest,
    scores: PromptScores | None,
    result: GenerationResult | None,
) -> dict[str, Any]:
    text = (scores.text if scores else "") + (result.text if result else "")
    parts = [p for p in (scores, result.scores if result else None) if p is not None]
    logprobs = None
    if body.logprobs is not None and parts:  # the echoed prompt's, then the output's
        logprobs = {"tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": []}
        start = 0
        for part in parts:
            logprobs["tokens"] += part.tokens
            logprobs["token_logprobs"] += part.token_logprobs
            logprobs["text_offset"] += [start + offset for offset in part.text_offset]
            logprobs["top_logprobs"] += part.top_logprobs or [None] * len(part.tokens)
            start += len(part.text)
        if not body.logprobs:
            logprobs["top_logprobs"] = None
    finish = result.finish_reason if result else "length"
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _chat_logprobs(scores: PromptScores | None) -> dict[str, Any] | None:
    """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if scores is None:
        return None
    tops = scores.top_logprobs or [None] * len(scores.tokens)
    return {
        "content": [
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())}
                    for t, v in (top or {}).items()
                ],
            }
            for token, logprob, top in zip(scores.tokens, scores.token_logprobs, tops, strict=True)
        ]
    }


def _usage(
    results: Sequence[GenerationResult | None], scores: Sequence[PromptScores | None]
) -> dict[str, int]:
    prompt = sum(
        r.prompt_tokens if r else len(s.token_ids) if s else 0
        for r, s in zip(results, scores, strict=True)
    )
    completion = sum(r.completion_tokens for r in results if r)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
