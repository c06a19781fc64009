"""Text generation and prompt scoring: what a serving replica runs for each batch of requests.

``generate_batch`` decodes several requests (from different callers) in one loop: the prompts
are left-padded into one batch, prefilled once, then decoded one forward per step over a KV
cache. Each row samples with its own seeded generator, so a seed gives the same text whatever
else shares the batch, and stops on its own EOS, ``max_tokens`` or stop strings, or when the
caller's ``step_guard``, entered around every step's sampling, names it (a revoked adapter).
``score_prompts`` gives the per-token log-probabilities of prompts (OpenAI ``echo`` +
``logprobs``). The adapter mixture, if any, is set on the model by the caller around these
calls; nothing here knows about adapters. No Ray, no HTTP.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# "abort": stopped by the caller's step guard; the caller turns it into an error, never text.
FinishReason = Literal["stop", "length", "abort"]
TokenCallback = Callable[[int, str], None]  # (request index, text delta)
RowsCallback = Callable[[list[int]], None]  # request indices now in the model's batch
# Entered around each step's sampling and streaming; yields the request indices to stop first.
StepGuard = Callable[[], AbstractContextManager[Collection[int]]]

# What decode() shows for bytes that end inside a UTF-8 character: the next token completes it.
_REPLACEMENT = "\ufffd"
# Prompt positions scored per forward: bounds the float32 logits (positions x vocab) in memory.
_SCORE_POSITIONS_PER_FORWARD = 2048
# Top-p candidates taken with topk before falling back to sorting the whole vocabulary.
_NUCLEUS_HEAD = 256


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (validated by the HTTP layer)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus: sample among the fewest top tokens whose mass reaches top_p
    seed: int | None = None  # None: nondeterministic
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks, load tests)
    logprobs: int | None = None  # k: each output token's log-probability and the top k


@dataclass(frozen=True)
class GenerationRequest:
    """One row of a batch: a tokenised prompt and its sampling parameters."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class GenerationResult:
    """The completion of one request.

    ``token_ids`` are the tokens produced, EOS excluded; with a stop string they include the
    tokens that formed it while ``text`` ends before it. ``completion_tokens`` counts every
    token sampled, EOS included (it cost a forward like any other).
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    scores: PromptScores | None = None  # the output tokens' log-probabilities, if asked


@dataclass(frozen=True)
class PromptScores:
    """OpenAI-style ``logprobs`` of a prompt's own tokens, for ``echo``.

    ``text`` is the decoded prompt; token ``i`` spans ``text[text_offset[i]:text_offset[i+1]]``
    (a token that ends inside a character spans nothing; the one completing it spans it all).
    """

    token_ids: list[int]
    tokens: list[str]  # each token decoded on its own
    token_logprobs: list[float | None]  # log p(token_i | tokens before it); None for the first
    text_offset: list[int]
    text: str
    top_logprobs: list[dict[str, float] | None] | None = None  # with top_logprobs=k >= 1


# --------------------------------------------------------------------------- generation


@dataclass
class _Row:
    """Mutable decoding state of one request (one row of the batch)."""

    index: int  # position in the caller's request list
    params: SamplingParams
    prompt_tokens: int
    detok: _Detokenizer
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
    on_rows_kept: RowsCallback | None = None,
    step_guard: StepGuard | None = None,
) -> list[GenerationResult]:
    """Complete every request in one batched, KV-cached decode loop; results in request order.

    ``on_token(i, delta)`` streams request ``i``'s text as it becomes final; its deltas
    concatenate exactly to ``results[i].text``. By default the model's batch keeps one row per
    request, in order, for the whole call (finished rows are fed padding), so per-row state the
    caller set on the model (a per-row adapter mixture) stays aligned. Passing
    ``on_rows_kept`` lets the loop drop finished rows (and requests with ``max_tokens=0``)
    instead, which saves compute: it is called with the request indices of the new batch
    rows, in order, before each forward whose batch differs from the last one.

    ``with step_guard() as stop:`` is entered around every step's sampling and streaming
    (the first right after prefill, never around a forward); ``stop`` holds the request
    indices to stop before sampling: they sample and stream nothing more, and finish with
    ``finish_reason="abort"``. The caller may hold a lock in it, so that whatever changes
    what ``stop`` would hold can wait for the step in progress. It runs every step: it must
    be cheap when there is nothing to stop (the replica compares one integer).
    """
    for i, request in enumerate(requests):
        if not request.prompt_ids:
            raise ValueError(
                f"requests[{i}].prompt_ids is empty: a prompt needs at least one token"
            )
    rows = [_new_row(i, request, tokenizer) for i, request in enumerate(requests)]
    for row in rows:
        if row.params.max_tokens <= 0:
            _finish(row, "length", "", on_token)
    if any(row.result is None for row in rows):
        batch = [row for row in rows if row.result is None] if on_rows_kept else rows
        if on_rows_kept and len(batch) < len(rows):
            on_rows_kept([row.index for row in batch])
        prompts = [requests[row.index].prompt_ids for row in batch]
        with torch.inference_mode():
            _decode_loop(model, tokenizer, prompts, batch, on_token, on_rows_kept, step_guard)
    for row in rows:
        if row.params.logprobs is not None and row.result is not None:
            n = len(row.result.token_ids)  # EOS is not an output token
            top = row.top[:n] if row.params.logprobs > 0 else None
            scores = _prompt_scores(tokenizer, row.result.token_ids, row.logprobs[:n], top)
            row.result = dataclasses.replace(row.result, scores=scores)
    return [row.result for row in rows]  # type: ignore[misc]  # every row finished


def _new_row(index: int, request: GenerationRequest, tokenizer: Any) -> _Row:
    params = request.params
    # An empty stop string would match at once; the HTTP layer rejects it, we ignore it.
    if any(not s for s in params.stop):
        params = dataclasses.replace(params, stop=tuple(s for s in params.stop if s))
    generator = None
    if params.temperature > 0:
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()  # nondeterministic, from the OS
        else:
            generator.manual_seed(params.seed)
    detok = _Detokenizer(tokenizer, skip_special_tokens=True)
    return _Row(index, params, len(request.prompt_ids), detok, generator)


def _decode_loop(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    batch: list[_Row],
    on_token: TokenCallback | None,
    on_rows_kept: RowsCallback | None,
    step_guard: StepGuard | None,
) -> None:
    """Prefill the batch once, then sample and forward one token per step until all finish."""
    from transformers import DynamicCache

    eos = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    ids, mask, pos = _left_pad(prompts, pad_id)  # (B,T) each
    cache = DynamicCache(config=model.config)
    logits = _forward_last(model, ids, mask, pos, cache)  # (B,V)
    next_pos = pos[:, -1:] + 1  # (B,1)
    guard = step_guard or (lambda: nullcontext(()))
    while True:
        with guard() as stop:
            _abort_rows(batch, stop)
            if all(row.result is not None for row in batch):
                return
            step = _sample_and_advance(logits, batch, eos, pad_id, on_token)  # (B,)
        live = [k for k, row in enumerate(batch) if row.result is None]
        if not live:
            return
        if on_rows_kept is not None and len(live) < len(batch):
            keep = torch.tensor(live)
            cache.batch_select_indices(keep)
            mask, next_pos, step = mask[keep], next_pos[keep], step[keep]
            batch = [batch[k] for k in live]
            on_rows_kept([row.index for row in batch])
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)  # (B,T+1)
        logits = _forward_last(model, step[:, None], mask, next_pos, cache)
        next_pos = next_pos + 1


def _abort_rows(batch: list[_Row], indices: Collection[int]) -> None:
    """Stop the unfinished rows among request ``indices``: nothing more is sampled or streamed."""
    if not indices:
        return
    stop = set(indices)
    for row in batch:
        if row.result is None and row.index in stop:
            text = row.detok.text[: row.emitted]  # what was streamed; the rest is dropped
            row.result = GenerationResult(
                list(row.detok.ids), text, "abort", row.prompt_tokens, row.produced
            )


def _sample_and_advance(
    logits: torch.Tensor,
    batch: list[_Row],
    eos: frozenset[int],
    pad_id: int,
    on_token: TokenCallback | None,
) -> torch.Tensor:
    """Sample a token for each unfinished row and apply it; the next input ids, (B,).

    Finished rows (still in the batch when rows are not dropped) get ``pad_id``: their output
    is final, and what they attend to no longer matters.
    """
    live = [k for k, row in enumerate(batch) if row.result is None]
    live_logits = logits if len(live) == len(batch) else logits[live]  # (L,V)
    tokens = _sample_next(live_logits, [batch[k] for k in live])
    _record_logprobs(live_logits, [batch[k] for k in live], tokens)
    step = torch.full((len(batch),), pad_id, dtype=torch.long)
    step[live] = torch.tensor(tokens)
    for k, token in zip(live, tokens, strict=True):
        _advance(batch[k], token, eos, on_token)
    return step


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 for log-probabilities (bf16 is too coarse), or in fp64 as they are:
    an fp64 model keeps its precision, so exactness tests run in fp64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _record_logprobs(logits: torch.Tensor, rows: list[_Row], tokens: list[int]) -> None:
    """For rows that asked: log p(token) = z[token] − logsumexp z, and the top-k.  logits: (L,V)"""
    wanted = [b for b, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return
    z = _at_least_fp32(logits[wanted])  # (W,V)
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
        **{_cache_kwarg(type(model)): cache},
    )
    return out.logits[:, -1, :]


def _advance(row: _Row, token: int, eos: frozenset[int], on_token: TokenCallback | None) -> None:
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


def _finish(row: _Row, reason: FinishReason, text: str, on_token: TokenCallback | None) -> None:
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


# --------------------------------------------------------------------------- sampling


def _sample_next(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Next token per row: argmax where temperature is 0, else a seeded draw.  logits: (B,V)

    Rows with top_p < 1 draw from the sorted nucleus, the others from the full distribution;
    each row's draw uses its own generator and only its own logits, so it does not depend
    on the other rows of the batch.
    """
    tokens = logits.argmax(dim=-1)  # (B,)
    plain = [b for b, r in enumerate(rows) if r.params.temperature > 0 and r.params.top_p >= 1]
    nucleus = [b for b, r in enumerate(rows) if r.params.temperature > 0 and r.params.top_p < 1]
    for group, draw in ((plain, _draw_full), (nucleus, _draw_nucleus)):
        if group:
            sub = [rows[b] for b in group]
            temperature = torch.tensor([r.params.temperature for r in sub])  # (S,)
            top_p = torch.tensor([r.params.top_p for r in sub])  # (S,)
            u = torch.cat([torch.rand(1, generator=r.generator) for r in sub])  # (S,) in [0,1)
            probs = torch.softmax(logits[group].float() / temperature[:, None], dim=-1)  # (S,V)
            tokens[group] = draw(probs, top_p, u)
    return tokens.tolist()


def _draw_full(probs: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds u.  probs: (S,V)

    token = min{ j : Σ_{i≤j} p_i > u · Σ_i p_i }   (scaling by the total absorbs rounding)
    """
    cdf = probs.cumsum(dim=-1)  # (S,V)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)  # (S,)
    return token.clamp(max=probs.shape[-1] - 1)


def _draw_nucleus(probs: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Top-p draw over the probabilities sorted descending, as far as top_p needs.  probs: (S,V)

    Sorting the whole vocabulary costs ~1.5 ms a row; the top 256 (``topk``) usually hold
    mass ≥ top_p and cost far less, so only rows whose head falls short sort everything.
    Which path a row takes depends on its own probabilities only, never on the batch.
    """
    head_p, head_i = probs.topk(min(_NUCLEUS_HEAD, probs.shape[-1]), dim=-1)  # (S,K) sorted
    enough = head_p.sum(dim=-1) >= top_p  # (S,)
    tokens = torch.empty(len(u), dtype=torch.long)
    if bool(enough.any()):
        tokens[enough] = _draw_sorted(head_p[enough], head_i[enough], top_p[enough], u[enough])
    if not bool(enough.all()):
        rest = ~enough
        sorted_p, order = probs[rest].sort(dim=-1, descending=True)  # (R,V)
        tokens[rest] = _draw_sorted(sorted_p, order, top_p[rest], u[rest])
    return tokens


def _draw_sorted(
    sorted_p: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF draw within the nucleus of descending probabilities.  sorted_p,order: (S,K)

    kept = #{ j : Σ_{i<j} p_(i) < top_p } (≥ 1); token = order[min{ j : Σ_{i≤j} p_(i) > u·mass }]
    with mass = Σ_{i<kept} p_(i), i.e. ``_draw_full`` over the renormalised nucleus.
    """
    cdf = sorted_p.cumsum(dim=-1)  # (S,K)
    kept = ((cdf - sorted_p) < top_p[:, None]).sum(dim=-1).clamp(min=1)  # (S,)
    mass = cdf.gather(1, (kept - 1)[:, None]).squeeze(1)  # (S,)
    j = torch.searchsorted(cdf, (u * mass)[:, None], right=True).squeeze(1)  # (S,)
    j = torch.minimum(j, kept - 1)
    return order.gather(1, j[:, None]).squeeze(1)


# --------------------------------------------------------------------------- scoring


def score_prompt(
    model: Any, tokenizer: Any, prompt_ids: list[int], *, top_logprobs: int = 0
) -> PromptScores:
    """Log-probability of each prompt token given the ones before it (see ``score_prompts``)."""
    return score_prompts(model, tokenizer, [prompt_ids], top_logprobs=top_logprobs)[0]


def score_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, top_logprobs: int = 0
) -> list[PromptScores]:
    """Score several prompts, batched; ``top_logprobs=k ≥ 1`` adds the k likeliest tokens.

    Prompts are right-padded (padding after a row's tokens cannot change them under a causal
    mask) and grouped so each forward holds at most ~2048 positions of float32 logits.
    """
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
    results: list[PromptScores] = []
    for group in _score_groups([len(p) for p in prompts]):
        with torch.inference_mode():
            scored = _score_group(model, [prompts[i] for i in group], top_logprobs)
        for i, (logprobs, top) in zip(group, scored, strict=True):
            results.append(
                _prompt_scores(
                    tokenizer, prompts[i], [None, *logprobs], None if top is None else [None, *top]
                )
            )
    return results


def _score_groups(lengths: list[int]) -> list[list[int]]:
    """Consecutive prompt indices whose padded batch stays within the positions budget."""
    groups: list[list[int]] = [[]]
    for i, n in enumerate(lengths):
        width = max([n] + [lengths[j] for j in groups[-1]])
        if groups[-1] and width * (len(groups[-1]) + 1) > _SCORE_POSITIONS_PER_FORWARD:
            groups.append([])
        groups[-1].append(i)
    return groups


def _score_group(
    model: Any, prompts: list[list[int]], k: int
) -> list[tuple[list[float], list[tuple[list[int], list[float]]] | None]]:
    """Per prompt: log p(x_t | x_<t) for t ≥ 1, and the top-k (ids, logprobs) per position.

    lp[b,t] = z[b,t-1,x_t] − logsumexp_v z[b,t-1,v]   z: (B,T,V) logits, lp: (B,T-1)
    """
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        mask[b, : len(prompt)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B,T,V)
    logits = _at_least_fp32(logits[:, :-1])  # (B,T-1,V): position t-1 predicts token t
    lse = torch.logsumexp(logits, dim=-1)  # (B,T-1)
    lp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - lse  # (B,T-1)
    top = None
    if k > 0:
        values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (B,T-1,k)
        top = (indices, values - lse[..., None])
    out = []
    for b, prompt in enumerate(prompts):
        n = len(prompt) - 1
        row_top = None
        if top is not None:
            row_top = list(zip(top[0][b, :n].tolist(), top[1][b, :n].tolist(), strict=True))
        out.append((lp[b, :n].tolist(), row_top))
    return out


def _prompt_scores(
    tokenizer: Any,
    token_ids: list[int],
    logprobs: list[float | None],
    top: list[tuple[list[int], list[float]] | None] | None,
) -> PromptScores:
    """Attach token strings and text offsets to per-token log-probabilities (and top-k).

    A prompt's first token has no log-probability (None); output tokens all have one.
    Special tokens are kept in the strings: the echo shows them.
    """
    detok = _Detokenizer(tokenizer, skip_special_tokens=False)
    offsets = []
    for token_id in token_ids:
        offsets.append(len(detok.stable))
        detok.push(token_id)
    tokens = tokenizer.batch_decode([[t] for t in token_ids], clean_up_tokenization_spaces=False)
    top_dicts: list[dict[str, float] | None] | None = None
    if top is not None:
        top_dicts = []
        for entry in top:
            if entry is None:
                top_dicts.append(None)
                continue
            ids, values = entry
            names = tokenizer.batch_decode([[t] for t in ids], clean_up_tokenization_spaces=False)
            row: dict[str, float] = {}
            for name, value in zip(names, values, strict=True):
                row.setdefault(name, value)  # two ids can decode alike: keep the likelier (first)
            top_dicts.append(row)
    return PromptScores(
        token_ids=list(token_ids),
        tokens=tokens,
        token_logprobs=list(logprobs),
        text_offset=offsets,
        text=detok.text,
        top_logprobs=top_dicts,
    )


# --------------------------------------------------------------------------- text


class _Detokenizer:
    """Decodes a growing token list at O(1) tokens per step, committing whole characters only.

    ``stable`` is the text of ``ids[:anchor]`` and ends on a character boundary; ``pending``
    is what later tokens add so far (it may end inside a character). Each push decodes
    ``ids[anchor-1:]`` and drops the text of ``ids[anchor-1]``: one token of left context
    keeps tokenizers that strip a leading space at the start of a string (SentencePiece)
    exact; vLLM's incremental detokenizer does the same.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool) -> None:
        self._decode = functools.partial(
            tokenizer.decode,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,  # it rewrites earlier text (" ." → ".")
        )
        self.ids: list[int] = []
        self.stable = ""
        self.pending = ""
        self._anchor = 0
        self._head = ""  # text of ids[anchor-1:anchor]

    @property
    def text(self) -> str:
        return self.stable + self.pending

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        context = max(self._anchor - 1, 0)
        new = self._decode(self.ids[context:])[len(self._head) :]
        if new.endswith(_REPLACEMENT):
            self.pending = new
            return
        self.stable += new
        self.pending = ""
        self._anchor = len(self.ids)
        self._head = self._decode(self.ids[-1:])


# --------------------------------------------------------------------------- chat + helpers


def apply_chat_template(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the base model's tokenizer has no chat template (tokenizer.chat_template is "
            "unset), so chat requests cannot be formatted; use /v1/completions with a plain "
            "prompt, or serve a base model whose tokenizer ships a chat template"
        )
    ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(t) for t in ids]


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _pad_id(tokenizer: Any) -> int:
    """Padding is masked out, so any id works; prefer the tokenizer's own."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@functools.cache
def _cache_kwarg(model_cls: type) -> str:
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
