"""Log-probabilities of tokens: scoring whole prompts (OpenAI ``echo`` + ``logprobs``), and
turning per-token log-probabilities into the ``PromptScores`` a response carries (the decode
loop uses that for the output tokens' ``logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapterswap.engine.requests import PromptScores
from adapterswap.engine.text import Detokenizer

# Prompt positions scored per forward: bounds the float32 logits (positions x vocab) in memory.
_SCORE_POSITIONS_PER_FORWARD = 2048


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
                build_scores(
                    tokenizer, prompts[i], [None, *logprobs], None if top is None else [None, *top]
                )
            )
    return results


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 for log-probabilities (bf16 is too coarse), or in fp64 as they are:
    an fp64 model keeps its precision, so exactness tests run in fp64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


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
    logits = at_least_fp32(logits[:, :-1])  # (B,T-1,V): position t-1 predicts token t
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


def build_scores(
    tokenizer: Any,
    token_ids: list[int],
    logprobs: list[float | None],
    top: list[tuple[list[int], list[float]] | None] | None,
) -> PromptScores:
    """Attach token strings and text offsets to per-token log-probabilities (and top-k).

    A prompt's first token has no log-probability (None); output tokens all have one.
    Special tokens are kept in the strings: the echo shows them.
    """
    detok = Detokenizer(tokenizer, skip_special_tokens=False)
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
