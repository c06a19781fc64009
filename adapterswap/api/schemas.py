"""The HTTP request bodies, validated once at the boundary (see API.md).

They follow OpenAI's completions and chat completions, plus AdapterSwap's ``adapters``,
``top_k`` and ``groups`` fields. OpenAI fields we do not implement are accepted only at
their neutral value (``n: 1``, penalties 0, ...) so that standard clients work, and are
refused with a 400 naming the field otherwise. Unknown fields are refused too.

Everything a replica will see is checked here, before the request joins a batch, so that
one request cannot fail its batch mates: every text field is valid Unicode (JSON's
``"\\ud800"`` escape decodes to a lone surrogate, which no tokenizer or UTF-8 encoder takes),
and adapter weights are finite, non-negative and at most :data:`MAX_ADAPTER_WEIGHT`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterswap.config import GROUP_PATTERN

MAX_STOP_SEQUENCES = 4
# The largest weight an explicit mixture may give one adapter. The router's weights sum to 1,
# and an adapter's delta s·BA is trained to be used at weight 1: at 100x it already swamps
# the base weights, so larger values have no use, while 1e300 overflows the composed delta
# (to inf in any float dtype). 100 keeps w·|s·B| finite in float16 (max 65504) for adapters
# whose own |s·B| is below 655, and in bfloat16 and float32 for any finite adapter.
MAX_ADAPTER_WEIGHT = 100.0


def _unicode_problem(value: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"not valid Unicode: lone surrogate {value[exc.start]!r} at character {exc.start}; "
            "send UTF-8 text (a JSON \\uD800-\\uDFFF escape must be half of a pair)"
        )
    return None


def _encodable(value: str) -> str:
    problem = _unicode_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A string a tokenizer, a log line and a Parquet file can all take.
Text = Annotated[str, AfterValidator(_encodable)]


def check_json_text(value: Any) -> Any:
    """Raise ValueError naming the first key or string inside ``value`` (a JSON value) that is
    not valid Unicode, by its path. Iterative, so deep nesting cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            problem = _unicode_problem(item)
            if problem:
                raise ValueError(f"{path}: {problem}" if path else problem)
        elif isinstance(item, dict):
            for key, inner in item.items():
                problem = _unicode_problem(key) if isinstance(key, str) else None
                if problem:
                    raise ValueError(f"a key in {path or 'the object'}: {problem}")
                stack.append((f"{path}.{key}" if path else str(key), inner))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}.{i}" if path else str(i), inner) for i, inner in enumerate(item))
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterWeight(_Body):
    """One adapter of an explicit mixture."""

    id: Text = Field(min_length=1, description="Adapter (shard) id, e.g. hr.b0001.000.")
    weight: float = Field(
        1.0,
        description=(
            f"Finite, non-negative and at most {MAX_ADAPTER_WEIGHT:g}. The router's weights sum "
            "to 1; far above that an adapter swamps the base model, and huge values overflow "
            "the composed delta."
        ),
    )

    @field_validator("weight")
    @classmethod
    def _finite_non_negative(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight must be finite and non-negative, got {value}")
        if value > MAX_ADAPTER_WEIGHT:
            raise ValueError(f"weight must be at most {MAX_ADAPTER_WEIGHT:g}, got {value:g}")
        return value


Adapters = Literal["auto", "none"] | Annotated[list[AdapterWeight], Field(max_length=16)]


class _InferenceBody(_Body):
    """Fields shared by both inference endpoints."""

    model: Text | None = Field(None, description="The served base model; any value is accepted.")
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 stop sequences.")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Seed for reproducible sampling (int64)."
    )
    stream: bool = Field(False, description="Server-sent events.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS to max_tokens (vLLM).")
    adapters: Adapters = Field("auto", description="'auto', 'none' or a weighted list.")
    top_k: int | None = Field(None, ge=0, le=16, description="Most adapters the router may use.")
    groups: list[Annotated[str, Field(pattern=f"^{GROUP_PATTERN}$")]] | None = Field(
        None, description="Restrict routing to these of the caller's groups."
    )
    n: Literal[1] = Field(1, description="Only 1 is supported.")
    user: Text | None = Field(None, description="Ignored (the key names the user).")
    presence_penalty: Literal[0, 0.0] = Field(0, description="Only 0 is supported.")
    frequency_penalty: Literal[0, 0.0] = Field(0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty is supported.")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted, ignored.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _options_text(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_json_text(value)

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported")
        return None


class CompletionRequest(_InferenceBody):
    """``POST /v1/completions``."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=32)] = Field(
        description="A string or a list of strings."
    )
    logprobs: int | None = Field(None, ge=0, le=5, description="Top alternatives per token.")
    echo: bool = Field(
        False, description="Return the prompt (with logprobs) before the completion."
    )
    suffix: None = Field(None, description="Not supported.")
    best_of: Literal[1] | None = Field(None, description="Only 1 is supported.")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @model_validator(mode="after")
    def _non_empty(self) -> CompletionRequest:
        if any(not p for p in self.prompts):
            raise ValueError("prompt must not be empty")
        return self


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text
    name: Text | None = None


class ChatRequest(_InferenceBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool = Field(False, description="Return log-probabilities of the output tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=5)


class DocumentIn(_Body):
    id: Text
    text: Text
    group: Text
    batch: Text | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_text(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_json_text(value)


class DocumentsRequest(_Body):
    """``POST /v1/documents``."""

    documents: list[DocumentIn] = Field(min_length=1)
    replace: bool = False
