"""What goes into and comes out of the engine: a request's sampling parameters, the request,
its result, and a prompt's per-token scores. Plain frozen values; the HTTP layer validates
them, the decode loop (``generation``) and the scorer (``scoring``) trust them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# "abort": stopped by the caller's step guard; the caller turns it into an error, never text.
FinishReason = Literal["stop", "length", "abort"]


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
    # Seconds from arrival at the engine: to a place in its batch, to the first token. Not
    # part of what the request produced, so not compared.
    queue_s: float | None = field(default=None, compare=False)
    first_token_s: float | None = field(default=None, compare=False)
    finish_s: float | None = field(default=None, compare=False)


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
