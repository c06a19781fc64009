"""Choosing each row's next token: greedy, full-distribution or top-p (nucleus) sampling.

Every sampled row draws with its own seeded generator from its own logits only, so a seed
gives the same text whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapterswap.engine.requests import SamplingParams

# Top-p candidates taken with topk before falling back to sorting the whole vocabulary.
_NUCLEUS_HEAD = 256


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """The row's own generator, seeded from ``params.seed`` (or the OS); None for greedy rows."""
    if params.temperature <= 0:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()  # nondeterministic, from the OS
    else:
        generator.manual_seed(params.seed)
    return generator


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Next token per row: argmax where temperature is 0, else a seeded draw.  logits: (B,V)

    Rows with top_p < 1 draw from the sorted nucleus, the others from the full distribution;
    each row's draw uses its own generator and only its own logits, so it does not depend
    on the other rows of the batch.
    """
    tokens = logits.argmax(dim=-1)  # (B,)
    plain = [b for b, p in enumerate(params) if p.temperature > 0 and p.top_p >= 1]
    nucleus = [b for b, p in enumerate(params) if p.temperature > 0 and p.top_p < 1]
    for group, draw in ((plain, _draw_full), (nucleus, _draw_nucleus)):
        if group:
            sub = [params[b] for b in group]
            temperature = torch.tensor([p.temperature for p in sub])  # (S,)
            top_p = torch.tensor([p.top_p for p in sub])  # (S,)
            u = torch.cat([torch.rand(1, generator=generators[b]) for b in group])  # (S,) [0,1)
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
