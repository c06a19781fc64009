"""The engine's KV cache: one row of preallocated key/value tensors per running sequence,
each at its own length. No Ray here.

``model.generate`` and ``generate_batch`` keep a batch's keys and values left-padded to a common
length, so a sequence joining a running batch would re-pad every row. Here each sequence owns
a row ``b`` of ``K, V (rows, kv_heads, width, head_dim)`` per layer and writes its token ``t``
at column ``t``, whatever the other rows hold; a forward over some rows attends through a
4-D mask built from the rows' own lengths (column ``j`` is visible to the query at position
``p`` of row ``b`` iff ``j <= p``), and their own position ids. A join writes only the new
row; the tensors grow by doubling (rows or width) when they must, so that cost is amortised.

Rows are kept in two regions so that a decode step reads one contiguous slice, never a
gathered copy: ``[0, decoding)`` holds the rows that decode, ``[decoding, count)`` the rows
still being prefilled (in no particular order). A row that finishes its prefill is swapped
to the front of the second region (:meth:`promote`); a row that leaves is swapped to the
end of its region, then out (:meth:`remove`). Each swap copies two rows' cached keys and
values, nothing else.

The object plays transformers' ``Cache`` for one forward (:meth:`view` then ``model(...,
cache=...)``): the attention layers call :meth:`update`, which writes the new keys and
values at each row's own columns and returns the rows' cached keys and values so far.
Supports models whose layers all attend to the full context (Llama, Mistral without a
sliding window, Qwen2, SmolLM2, ...); :func:`check_full_attention` refuses the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def check_full_attention(config: Any) -> None:
    """Refuse a model with sliding-window, linear or otherwise local attention layers."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if kinds != {"full_attention"} or window:
        raise ValueError(
            f"model: the serving engine supports models whose layers all attend to the full "
            f"context; this one has layer types {sorted(kinds)} and sliding_window={window}"
        )


@dataclass(frozen=True)
class _View:
    rows: torch.Tensor  # (B,) long: the cache rows in this forward, in batch order
    span: slice | None  # the same rows as a slice when they are contiguous (no copy)
    positions: torch.Tensor  # (B,q) long: the cache column (= position) of each query
    width: int  # columns the forward attends over


class SlotKVCache:
    """Keys and values of up to ``max_rows`` sequences, each at its own length."""

    def __init__(
        self,
        config: Any,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_rows: int,
        max_width: int,
        rows: int = 4,
        width: int = 256,
    ) -> None:
        check_full_attention(config)
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.layers = config.num_hidden_layers
        self.max_rows, self.max_width = max_rows, max_width
        self.dtype, self.device = dtype, torch.device(device)
        rows, width = min(rows, max_rows), min(width, max_width)
        shape = (rows, heads, width, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.lengths: list[int] = []  # tokens cached, per row in use
        self.owners: list[Any] = []  # what each row in use belongs to (the engine's row state)
        self.decoding = 0  # rows [0, decoding) decode; [decoding, count) are being prefilled
        self._view: _View | None = None

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.keys[0].shape[2]

    def bytes_per_token(self) -> int:
        """Memory one cached token takes across layers (keys and values)."""
        k = self.keys[0]
        return 2 * self.layers * k.shape[1] * k.shape[3] * k.element_size()

    # -- rows -----------------------------------------------------------------------------

    def add(self, owner: Any) -> int:
        """A new, empty row at the end of the prefill region; its index."""
        if self.count == self.max_rows:
            raise RuntimeError(f"the KV cache holds at most {self.max_rows} rows")
        if self.count == self.keys[0].shape[0]:
            self._grow(rows=min(2 * self.count, self.max_rows))
        self.lengths.append(0)
        self.owners.append(owner)
        return self.count - 1

    def promote(self, row: int) -> int:
        """Move a prefilled row into the decode region; its new index."""
        if row < self.decoding:
            raise ValueError(f"row {row} is decoding already")
        self._swap(row, self.decoding)
        self.decoding += 1
        return self.decoding - 1

    def remove(self, row: int) -> None:
        """Free a row (its sequence finished or left); the last rows move into the gap."""
        if row < self.decoding:
            self._swap(row, self.decoding - 1)
            self.decoding -= 1
            row = self.decoding
        self._swap(row, self.count - 1)
        self.lengths.pop()
        self.owners.pop()

    def index(self, owner: Any) -> int:
        return next(i for i, o in enumerate(self.owners) if o is owner)

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` cached tokens in a row (doubling the width if needed)."""
        if tokens > self.max_width:
            raise ValueError(f"{tokens} tokens do not fit the KV cache's {self.max_width}")
        if tokens > self.width:
            width = self.width
            while width < tokens:
                width *= 2
            self._grow(width=min(width, self.max_width))

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        n = max(self.lengths[i], self.lengths[j])
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[[i, j], :, :n] = t[[j, i], :, :n]
        self.lengths[i], self.lengths[j] = self.lengths[j], self.lengths[i]
        self.owners[i], self.owners[j] = self.owners[j], self.owners[i]

    def _grow(self, *, rows: int | None = None, width: int | None = None) -> None:
        old_rows, heads, old_width, head_dim = self.keys[0].shape
        rows, width = rows or old_rows, width or old_width
        for tensors in (self.keys, self.values):
            for layer, t in enumerate(tensors):
                grown = t.new_zeros((rows, heads, width, head_dim))
                grown[:old_rows, :, :old_width] = t
                tensors[layer] = grown

    # -- one forward ----------------------------------------------------------------------

    def view(
        self, rows: Sequence[int], q: int, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set up a forward of ``q`` query positions over ``rows``; returns its position ids
        (B,q) and 4-D additive mask (B,1,q,W). ``dtype``: the model's, if it was cast since
        (the cached keys and values are cast with it).

        A row with fewer than ``q`` new tokens is padded on the right: its padding queries
        write past the row's length (``advance`` does not count them), where nothing reads
        them before the row's next real tokens overwrite them.
        """
        if dtype is not None and dtype != self.dtype:
            self.dtype = dtype
            for tensors in (self.keys, self.values):
                tensors[:] = [t.to(dtype) for t in tensors]
        lengths = torch.tensor([self.lengths[r] for r in rows])  # (B,)
        self.reserve(int(lengths.max()) + q)
        positions = lengths[:, None] + torch.arange(q)  # (B,q)
        width = int(positions.max()) + 1
        columns = torch.arange(width)
        visible = columns[None, None, :] <= positions[:, :, None]  # (B,q,W)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible.to(self.device), torch.finfo(self.dtype).min)
        first, contiguous = rows[0], list(rows) == list(range(rows[0], rows[0] + len(rows)))
        span = slice(first, first + len(rows)) if contiguous else None
        index = torch.tensor(list(rows), device=self.device)
        self._view = _View(index, span, positions.to(self.device), width)
        return positions.to(self.device), mask[:, None]

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> None:
        """After the forward: each row now holds ``tokens[b]`` more real tokens."""
        for r, n in zip(rows, tokens, strict=True):
            self.lengths[r] += n
        self._view = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``Cache.update``: store the forward's keys and values (B,H,q,D) at
        each row's own columns; return the rows' keys and values so far (B,H,W,D)."""
        view = self._view
        if view is None:
            raise RuntimeError("SlotKVCache.update outside a forward: call view() first")
        out = []
        for tensors, new in ((self.keys, key_states), (self.values, value_states)):
            t = tensors[layer_idx]
            batch = view.rows[:, None].expand_as(view.positions)
            t.transpose(1, 2)[batch, view.positions] = new.transpose(1, 2).to(t.dtype)
            rows = t[view.span] if view.span is not None else t[view.rows]
            out.append(rows[:, :, : view.width])
        return out[0], out[1]
