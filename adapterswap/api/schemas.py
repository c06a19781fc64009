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

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapterswap.config import GROUP_PATTERN

MAX_STOP_SEQUENCES = 4
# The most prompts one completion request may hold (each is a row of the model's batch).
MAX_PROMPTS = 32
MAX_PAGE = 1000  # the most adapters one GET /v1/adapters answers (OpenAI lists cap at 100)
# The largest weight an explicit mixture may give one adapter. The router's weights sum to at
# most 1, and an adapter's delta s·BA is trained to be used at weight 1: at 100x it already swamps
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
            "to at most 1; far above that an adapter swamps the base model, and huge values "
            "overflow the composed delta."
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


class StreamOptions(_Body):
    """``stream_options``, as OpenAI has it; only with ``stream: true``."""

    include_usage: bool = Field(
        False,
        description=(
            "End the stream with a chunk holding the request's usage and no choices "
            "(choices: []); every other chunk then has usage: null."
        ),
    )


class _InferenceBody(_Body):
    """Fields shared by both inference endpoints."""

    model: Text | None = Field(
        None,
        description=(
            "The served base model's name (or 'adapterswap'): the adapters field decides; "
            "an adapter id (GET /v1/models lists them): that adapter alone."
        ),
    )
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
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _only_streams(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true (as in OpenAI's API)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported")
        return None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_InferenceBody):
    """``POST /v1/completions``."""

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description=(
            f"A string, a list of up to {MAX_PROMPTS} strings, token ids (a list of ints), or "
            "a list of such lists. Each prompt of a list is routed on its own text."
        )
    )
    logprobs: int | None = Field(None, ge=0, le=5, description="Top alternatives per token.")
    echo: bool = Field(
        False, description="Return the prompt (with logprobs) before the completion."
    )
    suffix: None = Field(None, description="Not supported.")
    best_of: Literal[1] | None = Field(None, description="Only 1 is supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        return check_prompt_shape(value)

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


def check_prompt_shape(value: Any) -> Any:
    """``prompt``'s shape, checked before pydantic's union does (whose errors would name a
    union branch, e.g. ``prompt.str``, instead of what is wrong): a non-empty string, token
    ids, or a list of 1 to :data:`MAX_PROMPTS` prompts of one kind. Messages name the item;
    the error layer prefixes the field (``prompt: ...``)."""
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return value
    if not isinstance(value, list):
        raise ValueError(
            "expected a string, a list of strings, a list of token ids (ints) or a list of "
            f"such lists; got {type(value).__name__}"
        )
    if not value:
        raise ValueError("an empty list; send at least one prompt")
    if _is_token_ids(value):
        _check_token_ids(value, "")
        return value
    if len(value) > MAX_PROMPTS:
        raise ValueError(
            f"{len(value)} prompts, over the limit of {MAX_PROMPTS} per request; send at most "
            f"{MAX_PROMPTS} per request (lm-eval: --batch_size {MAX_PROMPTS} or less)"
        )
    if not isinstance(value[0], str | list):
        raise ValueError(
            f"item 0: expected a string or a list of token ids; got {type(value[0]).__name__}"
        )
    kind = str if isinstance(value[0], str) else list
    for i, item in enumerate(value):
        if not isinstance(item, kind):
            raise ValueError(
                f"item {i} is {type(item).__name__}, item 0 {kind.__name__}: a list of "
                "prompts holds strings or lists of token ids, not both"
            )
        if kind is str and not item:
            raise ValueError(f"item {i}: must not be empty")
        if kind is list:
            _check_token_ids(item, f"item {i}, ")
    return value


def _is_token_ids(value: list[Any]) -> bool:
    return any(isinstance(item, int) for item in value) and not any(
        isinstance(item, str | list) for item in value
    )


def _check_token_ids(ids: list[Any], where: str) -> None:
    if not ids:
        raise ValueError(f"{where}an empty list of token ids; a prompt needs at least one")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(
                f"{where}token {i}: not a token id (a non-negative integer): {token!r}"
            )


class TextPart(_Body):
    """One part of a message's content, in OpenAI's shape. The served model reads text only,
    so an ``image_url``, ``input_audio`` or ``file`` part is refused by its ``type``."""

    type: str = Field(description="Only 'text'.")
    text: Text

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(
                f"only 'text' parts are supported (the served model reads text); got {value!r}"
            )
        return value


class ChatMessage(_Body):
    role: Literal["developer", "system", "user", "assistant"] = Field(
        description="'developer' is OpenAI's newer name for 'system', and is treated as it."
    )
    content: Text | list[TextPart] | None = Field(
        None,
        validate_default=True,
        description=(
            "A string, or a list of text parts (joined with newlines, as vLLM does). "
            "Only an assistant message may leave it out or send null."
        ),
    )
    name: Text | None = Field(None, description="Ignored.")

    @field_validator("content")
    @classmethod
    def _content_given(
        cls, value: str | list[TextPart] | None, info: ValidationInfo
    ) -> str | list[TextPart] | None:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError(
                "required: only an assistant message may have no content (null); send a "
                "string or a list of text parts"
            )
        return value

    def template_message(self) -> dict[str, str]:
        """The message as the chat template takes it: ``developer`` becomes ``system``, the
        text parts one string joined with newlines (vLLM's rule), null content empty."""
        content = self.content or ""
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_InferenceBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(
        None,
        ge=0,
        description="OpenAI's newer name for max_tokens (LangChain sends it); if both are "
        "given they must agree.",
    )
    logprobs: bool = Field(False, description="Return log-probabilities of the output tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("max_completion_tokens")
    @classmethod
    def _agrees_with_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        given = info.data.get("max_tokens")
        if value is not None and given is not None and value != given:
            raise ValueError(
                f"{value} disagrees with max_tokens={given}; send one of the two "
                "(max_completion_tokens is OpenAI's newer name for max_tokens)"
            )
        return value


class TokenizeRequest(_Body):
    """``POST /tokenize`` (vLLM's): a ``prompt``, or chat ``messages`` in the chat template."""

    model: Text | None = Field(None, description="Ignored: every model shares one tokenizer.")
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    add_special_tokens: bool = Field(True, description="With prompt: add BOS etc.")
    return_token_strs: bool = Field(False, description="Also return each token's string.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    """``POST /detokenize`` (vLLM's)."""

    model: Text | None = Field(None, description="Ignored: every model shares one tokenizer.")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="Token ids.")


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
