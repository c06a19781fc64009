"""Decoding rows: the per-row state and steps the serving engine runs, and a batch loop.

A :class:`DecodeRow` samples with its own seeded generator (``sampling``), so a seed gives the
same text whatever else shares the batch, and stops on its own EOS, ``max_tokens`` or stop
strings; ``advance_row``, ``record_logprobs``, ``abort_row`` and ``attach_scores`` are what the
engine (``loop.py``) applies to its rows each step.

``generate_batch`` decodes a fixed set of requests in process, in one loop: the prompts are
left-padded into one batch, prefilled once, then decoded one forward per step over
transformers' own ``DynamicCache``. It is the engine's reference: built on a different cache
and batching, a row's output must be the same from both (``tests/unit/test_engine.py``). The
adapter mixture, if any, is set on the model by the caller around the call; nothing here knows
about adapters. No Ray, no HTTP.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterswap.engine.requests import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from adapterswap.engine.sampling import new_generator, sample_next
from adapterswap.engine.scoring import at_least_fp32, build_scores
from adapterswap.engine.text import Detokenizer

TokenCallback = Callable[[int, str], None]  # (request index, text delta)


@dataclass
class DecodeRow:
    """Mutable decoding state of one request (one row of the batch)."""

    index: int  # position in the caller's request list
    params: SamplingParams
    prompt_tokens: int
    detok: Detokenizer
    generator: torch.Generator | None  # None for greedy rows
    emitted: int = 0  # characters of text already streamed
    produced: int = 0  # tokens sampled so far, EOS included
    result: GenerationResult | None = None
    # With params.logprobs: log p of each sampled token under the model (before temperature
    # and top_p, as vLLM reports them) and the top-k (ids, log p) at that step.
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)


def generate_batch(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    *,
    on_token: TokenCallback | None = None,
) -> list[GenerationResult]:
    """Complete every request in one batched, KV-cached decode loop; results in request order.

    ``on_token(i, delta)`` streams request ``i``'s text as it becomes final; its deltas
    concatenate exactly to ``results[i].text``. The model's batch keeps one row per request,
    in order, for the whole call (finished rows are fed padding), so per-row state the caller
    set on the model (a per-row adapter mixture) stays aligned.
    """
    for i, request in enumerate(requests):
        if not request.prompt_ids:
            raise ValueError(
                f"requests[{i}].prompt_ids is empty: a prompt needs at least one token"
            )
    rows = [new_row(i, request, tokenizer) for i, request in enumerate(requests)]
    for row in rows:
        if row.params.max_tokens <= 0:
            _finish(row, "length", "", on_token)
    if any(row.result is None for row in rows):
        prompts = [request.prompt_ids for request in requests]
        with torch.inference_mode():
            _decode_loop(model, tokenizer, prompts, rows, on_token)
    return [attach_scores(row, tokenizer) for row in rows]


def attach_scores(row: DecodeRow, tokenizer: Any) -> GenerationResult:
    """A finished row's result, with its output tokens' log-probabilities if it asked."""
    result = row.result
    assert result is not None, "attach_scores: the row has not finished"
    if row.params.logprobs is None:
        return result
    n = len(result.token_ids)  # EOS is not an output token
    top = row.top[:n] if row.params.logprobs > 0 else None
    scores = build_scores(tokenizer, result.token_ids, row.logprobs[:n], top)
    return dataclasses.replace(result, scores=scores)


def new_row(index: int, request: GenerationRequest, tokenizer: Any) -> DecodeRow:
    params = request.params
    # An empty stop string would match at once; the HTTP layer rejects it, we ignore it.
    if any(not s for s in params.stop):
        params = dataclasses.replace(params, stop=tuple(s for s in params.stop if s))
    detok = Detokenizer(tokenizer, skip_special_tokens=True)
    return DecodeRow(index, params, len(request.prompt_ids), detok, new_generator(params))


def _decode_loop(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    batch: list[DecodeRow],
    on_token: TokenCallback | None,
) -> None:
    """Prefill the batch once, then sample and forward one token per step until all finish."""
    from transformers import DynamicCache

    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    ids, mask, pos = _left_pad(prompts, pad)  # (B,T) each
    cache = DynamicCache(config=model.config)
    logits = _forward_last(model, ids, mask, pos, cache)  # (B,V)
    next_pos = pos[:, -1:] + 1  # (B,1)
    while True:
        step = _sample_and_advance(logits, batch, eos, pad, on_token)  # (B,)
        if all(row.result is not None for row in batch):
            return
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)  # (B,T+1)
        logits = _forward_last(model, step[:, None], mask, next_pos, cache)
        next_pos = next_pos + 1


def abort_row(row: DecodeRow) -> None:
    """Finish a row with ``"abort"``: its text is what was streamed; the rest is dropped."""
    text = row.detok.text[: row.emitted]
    row.result = GenerationResult(
        list(row.detok.ids), text, "abort", row.prompt_tokens, row.produced
    )


def _sample_and_advance(
    logits: torch.Tensor,
    batch: list[DecodeRow],
    eos: frozenset[int],
    pad_id: int,
    on_token: TokenCallback | None,
) -> torch.Tensor:
    """Sample a token for each unfinished row and apply it; the next input ids, (B,).

    Finished rows (still in the batch) get ``pad_id``: their output
    is final, and what they attend to no longer matters.
    """
    live = [k for k, row in enumerate(batch) if row.result is None]
    live_logits = logits if len(live) == len(batch) else logits[live]  # (L,V)
    rows = [batch[k] for k in live]
    tokens = sample_next(live_logits, [r.params for r in rows], [r.generator for r in rows])
    record_logprobs(live_logits, rows, tokens)
    step = torch.full((len(batch),), pad_id, dtype=torch.long)
    step[live] = torch.tensor(tokens)
    for k, token in zip(live, tokens, strict=True):
        advance_row(batch[k], token, eos, on_token)
    return step


def record_logprobs(logits: torch.Tensor, rows: list[DecodeRow], tokens: list[int]) -> None:
    """For rows that asked: log p(token) = z[token] − logsumexp z, and the top-k.  logits: (L,V)"""
    wanted = [b for b, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return
    z = at_least_fp32(logits[wanted])  # (W,V)
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)  # (W,V)
    chosen = logp.gather(-1, torch.tensor([tokens[b] for b in wanted])[:, None]).squeeze(-1)
    k = max(rows[b].params.logprobs or 0 for b in wanted)
    values, indices = logp.topk(k, dim=-1) if k else (None, None)  # (W,k)
    for w, b in enumerate(wanted):
        rows[b].logprobs.append(float(chosen[w]))
        if k:
            n = rows[b].params.logprobs or 0
            rows[b].top.append((indices[w, :n].tolist(), values[w, :n].tolist()))


def _left_pad(
    prompts: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts to a common length T, with mask and positions.  ids,mask,pos: (B,T)

    pos[b,t] = max(0, Σ_{t'≤t} mask[b,t'] − 1), as ``model.generate`` computes it: a row's real
    tokens get positions 0.. whatever padding the batch gave it, so rotary embeddings (and
    so outputs) match the row run alone.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[b, width - len(prompt) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _forward_last(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
) -> torch.Tensor:
    """Next-token logits after each row, appending ids' keys/values to ``cache``.

    ids,pos: (B,q)  mask: (B, cached+q)  →  logits (B,V), only the last position projected
    onto the vocabulary (``logits_to_keep=1``: prefill never builds a (B,T,V) tensor).
    """
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(type(model)): cache},
    )
    return out.logits[:, -1, :]


def advance_row(
    row: DecodeRow, token: int, eos: frozenset[int], on_token: TokenCallback | None
) -> None:
    """Apply one sampled token to a row: EOS, stop strings, max_tokens, then stream."""
    row.produced += 1
    if token in eos and not row.params.ignore_eos:
        _finish(row, "stop", row.detok.text, on_token)
        return
    row.detok.push(token)
    text, stops = row.detok.text, row.params.stop
    cut = _find_stop(text, stops, start=row.emitted)
    if cut is not None:
        _finish(row, "stop", text[:cut], on_token)
    elif row.produced >= row.params.max_tokens:
        _finish(row, "length", text, on_token)
    elif on_token is not None:
        # Only whole characters are final, and not a tail that may be the start of a stop string.
        stable = row.detok.stable
        end = len(stable) - _stop_prefix_len(stable, stops, start=row.emitted)
        if end > row.emitted:
            on_token(row.index, stable[row.emitted : end])
            row.emitted = end


def _finish(
    row: DecodeRow, reason: FinishReason, text: str, on_token: TokenCallback | None
) -> None:
    if on_token is not None and len(text) > row.emitted:
        on_token(row.index, text[row.emitted :])
    row.emitted = len(text)
    row.result = GenerationResult(
        list(row.detok.ids), text, reason, row.prompt_tokens, row.produced
    )


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the earliest stop string begins in ``text[start:]``, or None.

    Text before ``start`` was streamed already, and streaming holds back any tail that could
    begin a stop string, so no stop string can begin before it.
    """
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: tuple[str, ...], start: int) -> int:
    """Length of the longest tail of ``text[start:]`` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def pad_id(tokenizer: Any) -> int:
    """Padding is masked out, so any id works; prefer the tokenizer's own."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@functools.cache
def cache_kwarg(model_cls: type) -> str:
    """The forward() keyword for the KV cache: transformers renamed ``past_key_values`` to
    ``cache`` during 5.x; wrappers that take ``**kwargs`` follow the installed convention."""
    import transformers

    for forward in (model_cls.forward, transformers.LlamaModel.forward):
        params = inspect.signature(forward).parameters
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
    return "past_key_values"
