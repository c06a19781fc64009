"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info``, as vLLM's server has them.

Evaluation harnesses find the served model's tokenizer through these (lm-evaluation-harness's
``local-completions`` auto-detects them, then sends prompts as token ids and measures context
lengths with them), so they answer without a key, as vLLM's do: they expose only the base
model's public tokenizer, never an adapter, a document or anything of a caller. Their cost is
bounded like every other path's, by ``serve.max_body_bytes``.
"""

from __future__ import annotations

from typing import Any

from adapterswap.api.schemas import DetokenizeRequest, TokenizeRequest
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.text import apply_chat_template
from adapterswap.errors import InvalidArgument

# The tokenizer's settings /tokenizer_info reports (vLLM reports its tokenizer's init kwargs;
# these are the ones clients read: lm-eval the special tokens and the chat template).
_INFO_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")


def check_vocabulary(tokenizer: Any, token_ids: list[int], where: str) -> None:
    """InvalidArgument for the first id past the tokenizer's vocabulary; ``where`` names the
    field, with ``{}`` for the id's position (ids are non-negative, as the schemas check)."""
    vocab = len(tokenizer)
    for position, token in enumerate(token_ids):
        if token >= vocab:
            raise InvalidArgument(
                f"{where.format(position)}: {token} is not a token id of the base model's "
                f"tokenizer (0 to {vocab - 1})"
            )


class TokenizerEndpoints:
    """The base model's tokenizer over HTTP. A part of the Gateway, which sets these."""

    config: AdapterSwapConfig
    tokenizer: Any

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """``POST /tokenize``: a prompt's (or a chat's, in its template) token ids."""
        if body.messages is not None:
            messages = [m.template_message() for m in body.messages]
            try:
                ids = apply_chat_template(self.tokenizer, messages)
            except ValueError as exc:  # no chat template
                raise InvalidArgument(f"messages: {exc}") from None
        else:
            ids = self.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)
            ids = ids["input_ids"]
        # Not refused past serve.max_prompt_tokens: harnesses tokenize long texts to cut them.
        limit = self.config.serve.max_prompt_tokens
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        """``POST /detokenize``: the text of token ids."""
        check_vocabulary(self.tokenizer, body.tokens, "tokens.{}")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        """``GET /tokenizer_info``: the tokenizer's class, special tokens and chat template."""
        info = {field: getattr(self.tokenizer, field, None) for field in _INFO_FIELDS}
        return {
            "tokenizer_class": type(self.tokenizer).__name__,
            **info,
            "model_max_length": self.config.serve.max_prompt_tokens,
        }
