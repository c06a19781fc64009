"""The HTTP request bodies, validated once at the boundary (see API.md).

They follow OpenAI's completions and chat completions, plus AdapterSwap's ``adapters``,
``top_k`` and ``groups`` fields. OpenAI fields we do not implement are accepted only at
their neutral value (``n: 1``, penalties 0, ...) so that standard clients work, and are
refused with a 400 naming the field otherwise. Unknown fields are refused too.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterswap.config import GROUP_PATTERN

MAX_STOP_SEQUENCES = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterWeight(_Body):
    """One adapter of an explicit mixture."""

    id: str = Field(min_length=1, description="Adapter (shard) id, e.g. hr.b0001.000.")
    weight: float = Field(1.0, description="Finite and non-negative.")

    @field_validator("weight")
    @classmethod
    def _finite_non_negative(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight must be finite and non-negative, got {value}")
        return value


Adapters = Literal["auto", "none"] | Annotated[list[AdapterWeight], Field(max_length=16)]


class _InferenceBody(_Body):
    """Fields shared by both inference endpoints."""

    model: str | None = Field(None, description="The served base model; any value is accepted.")
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop sequences.")
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
    user: str | None = Field(None, description="Ignored (the key names the user).")
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

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported")
        return None


class CompletionRequest(_InferenceBody):
    """``POST /v1/completions``."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=32)] = Field(
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
    content: str
    name: str | None = None


class ChatRequest(_InferenceBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool = Field(False, description="Return log-probabilities of the output tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=5)


class DocumentIn(_Body):
    id: str
    text: str
    group: str
    batch: str | None = None
    metadata: dict[str, Any] | None = None


class DocumentsRequest(_Body):
    """``POST /v1/documents``."""

    documents: list[DocumentIn] = Field(min_length=1)
    replace: bool = False
