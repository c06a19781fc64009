"""OpenAI's response shapes: envelopes, choices, log-probabilities, usage, stream chunks.

Pure functions from the engine's results to the JSON the endpoints return, so the shapes
live in one place and the inference code reads as routing and model calls.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from adapterswap.api.schemas import CompletionRequest
from adapterswap.engine.requests import GenerationResult, PromptScores
from adapterswap.types import AdapterRef


def describe_adapter(ref: AdapterRef, group: str, weight: float) -> dict[str, Any]:
    """One adapter of the response's ``adapterswap`` block."""
    return {"id": ref.id, "version": ref.version, "group": group, "weight": weight}


def envelope(kind: str, model_id: str) -> dict[str, Any]:
    """The fields every response and chunk starts with: id, object, created, model."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


def completion_choice(
    index: int,
    body: CompletionRequest,
    scores: PromptScores | None,
    result: GenerationResult | None,
) -> dict[str, Any]:
    """A completion's choice: the echoed prompt's text and log-probabilities, then the output's."""
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


def chat_choice(result: GenerationResult, logprobs: bool) -> dict[str, Any]:
    """A chat completion's one choice."""
    return {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "finish_reason": result.finish_reason,
        "logprobs": chat_logprobs(result.scores) if logprobs else None,
    }


def chat_logprobs(scores: PromptScores | None) -> dict[str, Any] | None:
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


def usage(
    results: Sequence[GenerationResult | None], scores: Sequence[PromptScores | None]
) -> dict[str, int]:
    """Token counts: the prompts' (generated or only scored) and the completions'."""
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


def _chunk(head: dict[str, Any], piece: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish}
    return {**head, "choices": [choice]}


def role_chunk(head: dict[str, Any]) -> dict[str, Any]:
    """A chat stream's first chunk: the role, with empty content, as vLLM sends it."""
    return _chunk(head, {"delta": {"role": "assistant", "content": ""}}, None)


def stream_chunk(head: dict[str, Any], delta: str, chat: bool) -> dict[str, Any]:
    """One streamed piece of text, under the stream's ``head`` (its :func:`envelope`)."""
    return _chunk(head, {"delta": {"content": delta}} if chat else {"text": delta}, None)


def last_chunk(head: dict[str, Any], chat: bool, finish_reason: str) -> dict[str, Any]:
    """The chunk that ends a stream's choice, with the reason the answer without streaming
    gives (``length``, ``stop``)."""
    return _chunk(head, {"delta": {}} if chat else {"text": ""}, finish_reason)


def usage_chunk(head: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """``stream_options.include_usage``'s chunk, after the last: no choices, the usage."""
    return {**head, "choices": [], "usage": counts}
