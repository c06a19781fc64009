"""Text to token ids and back: the chat template going in, the incremental detokenizer coming
out (used by the decode loop to stream whole characters, and by scoring for text offsets).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

# What decode() shows for bytes that end inside a UTF-8 character: the next token completes it.
_REPLACEMENT = "\ufffd"


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


class Detokenizer:
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
