"""The adapter bank: which adapter sits in which slot of a model's mixture layers, and the
batch mixtures composed from them. No Ray here.

:class:`AdapterBank` injects the mixture layers (``layer``) and manages their slots: PEFT state
dicts in (checked by ``adapter_files``), an LRU bounded by ``serve.adapter_cache_bytes``,
pinning of the in-flight batch, eviction that zeroes memory (revocation), and
``with bank.mixture(rows):`` around a forward or generate. Its lock is never held during I/O:
adapter files load outside it and install under it, so a slow load never delays an eviction,
and an adapter evicted while it loads is never installed. A serving engine installs adapters
already parsed in host memory (``pin_from``, from ``adapterswap.engine.adapter_tiers``), and
asks :meth:`AdapterBank.fits` first, so a row joins only when its adapters fit beside the
running rows'.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterswap.compose.adapter_files import adapter_name, parse_adapter
from adapterswap.compose.layer import (
    MixturePlan,
    find_target_linears,
    inject_mixture_layers,
)
from adapterswap.config import LoraSettings, ServeSettings
from adapterswap.errors import AdapterNotLoaded, InvalidMixture, SlotsExhausted, StaleMixture
from adapterswap.types import AdapterRef, Mixture

_PREPARED = 4  # layouts kept (see AdapterBank.use)
AdapterLoader = Callable[[AdapterRef], tuple[dict[str, torch.Tensor], dict[str, Any]]]
# An adapter validated for the bank's layers: {module: (A (r,d_in), B (d_out,r), s)}
ParsedAdapter = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
# ref -> its parsed tensors, ready to copy into a slot (e.g. from a host-memory cache)
ParsedSource = Callable[[AdapterRef], ParsedAdapter]


def _clean_row(index: int, row: Sequence[tuple[AdapterRef, float]]) -> dict[AdapterRef, float]:
    """One row's {ref: weight}: weights finite and >= 0, duplicates summed, zeros dropped."""
    merged: dict[AdapterRef, float] = {}
    for ref, weight in row:
        if not isinstance(ref, AdapterRef):
            raise InvalidMixture(f"mixture row {index}: {ref!r} is not an AdapterRef")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidMixture(
                f"mixture row {index}: weight {weight} for {adapter_name(ref)}; weights must be "
                "finite and >= 0"
            )
        merged[ref] = merged.get(ref, 0.0) + weight
    return {ref: w for ref, w in merged.items() if w > 0}


@dataclass
class _Loading:
    """An adapter being read by one thread, outside the bank's lock; others wait on ``done``."""

    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # evicted (revoked) while it loaded: it must not be installed
    error: BaseException | None = None


class AdapterBank:
    """LoRA slots injected into one base model: an LRU of loaded adapters, and batch mixtures.

    Capacity is ``cache_bytes // slot_bytes`` slots (at least one). A mixture's precomputed
    ``A_u``, ``B_u`` are transient and not counted. Thread-safe for a serving loop plus a
    revocation handler; one mixture is active at a time, since the layers hold it. The lock
    guards slots and indexes only: loaders (file or network reads) run outside it.
    """

    def __init__(
        self, model: nn.Module, target_modules: Iterable[str], r_max: int, cache_bytes: int
    ) -> None:
        targets = find_target_linears(model, target_modules)
        size = next(iter(targets.values())).weight.element_size()
        self.slot_bytes = sum(r_max * (m.in_features + m.out_features) for m in targets.values())
        self.slot_bytes *= size
        self.capacity = max(1, cache_bytes // self.slot_bytes)
        self.cache_bytes = cache_bytes
        self.layers = inject_mixture_layers(model, target_modules, self.capacity, r_max)
        self.model = model  # run it (forward, generate) inside `with bank.mixture(...)`
        self.r_max = r_max
        self.hits = self.misses = self.evictions = 0
        self._index: OrderedDict[AdapterRef, int] = OrderedDict()  # LRU first
        self._ranks: dict[int, int] = {}  # slot -> largest rank over its layers
        self._bounds: dict[int, float] = {}  # slot -> max |s · B| over its layers
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._pins: Counter[int] = Counter()  # slot -> rows of in-flight mixtures using it
        self._loading: dict[AdapterRef, _Loading] = {}  # loads in progress, outside the lock
        self._active = False  # a `mixture()` block is open
        # Layouts of recent row sets, and each layer's A_u, B_u for them: a serving loop that
        # alternates forwards (decode, prefill) sets each without recomputing it. Dropped
        # whenever a slot is written or cleared, so no copy of an evicted adapter outlives it.
        self._prepared: OrderedDict[tuple, dict[str, Any] | None] = OrderedDict()
        self._lock = threading.RLock()

    @classmethod
    def from_settings(
        cls, model: nn.Module, lora: LoraSettings, serve: ServeSettings, r_max: int | None = None
    ) -> AdapterBank:
        """A bank for ``lora.target_modules``, ranks up to ``r_max`` (default ``lora.rank``)."""
        return cls(model, lora.target_modules, r_max or lora.rank, serve.adapter_cache_bytes)

    def __contains__(self, ref: AdapterRef) -> bool:
        return ref in self._index

    def loaded(self) -> list[AdapterRef]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._index)

    def slot_of(self, ref: AdapterRef) -> int:
        return self._index[ref]

    def load(self, ref: AdapterRef, state_dict: dict[str, torch.Tensor], config: dict) -> int:
        """Validate and load an adapter (replacing it if loaded); returns its slot.

        Raises ``InvalidAdapter`` (a ``ValueError``) before touching any slot, and
        ``SlotsExhausted`` when every slot is pinned by the in-flight batch.
        """
        parsed = parse_adapter(ref, state_dict, config, self.layers)
        with self._lock:
            return self._install(ref, parsed)

    def _install(self, ref: AdapterRef, parsed: ParsedAdapter) -> int:
        """Write parsed tensors into a slot (the caller holds the lock; no I/O here)."""
        slot = self._index.pop(ref, None)
        if slot is None:
            slot = self._take_slot()
        else:
            self._clear(slot)
        self._prepared.clear()
        for module, (a, b, scale) in parsed.items():
            self.layers[module].write_slot(slot, a, b, scale)
        self._ranks[slot] = max(a.shape[0] for a, _, _ in parsed.values())
        self._bounds[slot] = max(s * float(b.abs().max()) for _, b, s in parsed.values())
        self._index[ref] = slot
        return slot

    def get_or_load(self, ref: AdapterRef, loader: AdapterLoader) -> int:
        """The adapter's slot, calling ``loader(ref) -> (state_dict, config)`` on a miss.

        The loader runs outside the lock; concurrent misses on one ref read it once. An
        eviction of ``ref`` while it loads wins: the load raises ``StaleMixture`` and
        installs nothing.
        """
        return self._acquire(ref, self._parsing(loader), pin=False)

    def _parsing(self, loader: AdapterLoader) -> ParsedSource:
        """``loader``'s files, validated against the bank's layers (run outside the lock)."""
        return lambda ref: parse_adapter(ref, *loader(ref), self.layers)

    def _acquire(self, ref: AdapterRef, source: ParsedSource, *, pin: bool) -> int:
        """``get_or_load``, pinning the slot in the same critical section when asked."""
        while True:
            with self._lock:
                slot = self._index.get(ref)
                if slot is not None:
                    self.hits += 1
                    self._index.move_to_end(ref)
                    if pin:
                        self._pins[slot] += 1
                    return slot
                pending = self._loading.get(ref)
                owner = pending is None
                if owner:
                    pending = self._loading[ref] = _Loading()
                    self.misses += 1
            if owner:
                return self._load_outside_lock(ref, source, pending, pin=pin)
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            # Loaded by the other thread: take it from the index (or load again if it was
            # already evicted to make room, which the next pass sees).

    def _load_outside_lock(
        self, ref: AdapterRef, source: ParsedSource, pending: _Loading, *, pin: bool
    ) -> int:
        """Get ``ref``'s tensors with no lock held, then install them unless it was evicted."""
        try:
            try:
                parsed = source(ref)  # I/O or a cache lookup: no lock held
            except BaseException:
                with self._lock:
                    self._loading.pop(ref, None)
                raise
            with self._lock:  # one critical section: an eviction lands before or after it
                self._loading.pop(ref, None)
                if pending.cancelled:
                    raise StaleMixture(
                        f"adapter {ref.id!r} version {ref.version} was revoked while it loaded"
                    )
                slot = self._install(ref, parsed)
                if pin:
                    self._pins[slot] += 1
                return slot
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            pending.done.set()

    def evict(self, ref: AdapterRef) -> bool:
        """Drop an adapter now and zero its slot; False if it was not loaded.

        Works even while the in-flight batch uses it: that batch (admitted before) finishes
        with its own precomputed copy, released when its mixture exits; no later one sees it.
        A load of ``ref`` in progress is cancelled: it installs nothing.
        """
        with self._lock:
            pending = self._loading.get(ref)
            if pending is not None:
                pending.cancelled = True
            slot = self._index.pop(ref, None)
            if slot is None:
                return False
            self._clear(slot)
            if slot not in self._pins:
                self._free.append(slot)
            return True

    def evict_all_except(self, keep: Iterable[AdapterRef]) -> list[AdapterRef]:
        """Drop every loaded adapter not in ``keep`` (e.g. the store's servable versions)."""
        keep = set(keep)
        with self._lock:
            for ref, pending in self._loading.items():
                if ref not in keep:
                    pending.cancelled = True
            dropped = [ref for ref in self._index if ref not in keep]
            for ref in dropped:
                self.evict(ref)
            return dropped

    def _clear(self, slot: int) -> None:
        self._prepared.clear()
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._ranks.pop(slot, None)
        self._bounds.pop(slot, None)

    def _take_slot(self) -> int:
        """A free slot, evicting the least recently used unpinned adapter if none is free."""
        if self._free:
            return self._free.pop()
        for ref, slot in self._index.items():
            if slot not in self._pins:
                del self._index[ref]
                self._clear(slot)
                self.evictions += 1
                return slot
        raise SlotsExhausted(
            f"all {self.capacity} adapter slots are pinned by the in-flight batch; raise "
            f"serve.adapter_cache_bytes (now {self.cache_bytes}; {self.slot_bytes} bytes per "
            "slot) or lower serve.max_batch_size or router.top_k"
        )

    @contextmanager
    def mixture(
        self, rows: Sequence[Mixture], loader: AdapterLoader | None = None
    ) -> Iterator[None]:
        """Compose ``rows[b] = [(ref, weight), ...]`` for batch row b inside the block.

        Every ref must be loaded, or ``loader`` is called for the missing ones. The batch's
        slots stay pinned and each layer's precomputed mixture stays set until the block
        exits, even on an exception. An empty row is the base model for that row.
        """
        cleaned = [_clean_row(i, row) for i, row in enumerate(rows)]
        with self._lock:
            if self._active:
                raise RuntimeError("a mixture is already active on this bank; exit it first")
            self._active = True
        source = None if loader is None else self._parsing(loader)
        slot_rows: list[dict[int, float]] = []
        try:
            for i, row in enumerate(cleaned):
                slot_rows.append(self._pin_cleaned(i, row, source))
            self.use(slot_rows)
            yield
        finally:
            self.use([])
            for row in slot_rows:
                self.unpin(row)
            with self._lock:
                self._active = False

    def pin(
        self, row: Sequence[tuple[AdapterRef, float]], loader: AdapterLoader | None = None
    ) -> dict[int, float]:
        """One request's mixture as ``{slot: weight}``, its slots pinned until :meth:`unpin`:
        a serving loop pins a row when it joins and unpins it when it leaves.

        Loads missing adapters with ``loader`` (outside the lock). Raises
        ``InvalidMixture``, ``SlotsExhausted``, ``StaleMixture`` (evicted while it loaded),
        ``AdapterNotLoaded``, or whatever the loader or parsing raised, and pins nothing then.
        """
        return self._pin_cleaned(
            0, _clean_row(0, row), None if loader is None else self._parsing(loader)
        )

    def pin_from(
        self, row: Sequence[tuple[AdapterRef, float]], source: ParsedSource
    ) -> dict[int, float]:
        """:meth:`pin`, installing each missing adapter from ``source(ref)``: tensors already
        parsed (the host tier), so the bank's lock is held for a copy, never for I/O.

        The row's loaded adapters are pinned before any is installed, so installing one never
        evicts another of the same row: :meth:`fits` said beforehand whether the row fits.
        """
        cleaned = _clean_row(0, row)
        loaded_first = sorted(cleaned.items(), key=lambda item: item[0] not in self._index)
        return self._pin_cleaned(0, dict(loaded_first), source)

    def fits(self, refs: Collection[AdapterRef]) -> bool:
        """Whether a row of ``refs`` can be pinned now beside the pinned (running) rows:
        distinct slots they pin, with this row's loaded ones, plus one per missing ref, fit
        the capacity. Pinning a row that does not fit would evict a running row's adapter or
        fail (thrash); a scheduler waits instead.

        Raises ``SlotsExhausted`` when ``refs`` alone need more slots than the bank has.
        """
        refs = set(refs)
        if len(refs) > self.capacity:
            raise SlotsExhausted(
                f"this request's mixture needs {len(refs)} adapter slots and the bank has "
                f"{self.capacity}; raise serve.adapter_cache_bytes (now {self.cache_bytes}; "
                f"{self.slot_bytes} bytes per slot) or lower router.top_k"
            )
        with self._lock:
            held = set(self._pins) | {self._index[r] for r in refs if r in self._index}
            return len(held) + sum(r not in self._index for r in refs) <= self.capacity

    @property
    def bytes_used(self) -> int:
        """Bytes of the slots that hold an adapter (the bank's memory is reserved whole)."""
        return len(self._index) * self.slot_bytes

    def _pin_cleaned(
        self, index: int, row: dict[AdapterRef, float], source: ParsedSource | None
    ) -> dict[int, float]:
        slots: dict[int, float] = {}
        try:
            for ref, w in row.items():
                slots[self._resolve(ref, source)] = w
            with self._lock:  # an eviction after this point zeroes a slot; it cannot move it
                self._check_finite([slots], first=index)
        except BaseException:
            self.unpin(slots)
            raise
        return slots

    def unpin(self, slots: Iterable[int]) -> None:
        """Release a row's slots (from :meth:`pin`); an evicted slot is free once unused."""
        with self._lock:
            for slot in slots:
                self._pins[slot] -= 1
                if self._pins[slot] <= 0:
                    del self._pins[slot]
                    if slot not in self._index.values():
                        self._free.append(slot)

    def use(self, slot_rows: Sequence[dict[int, float]]) -> None:
        """Set the layers for a forward whose batch row b composes ``slot_rows[b]`` (pinned
        rows from :meth:`pin`); ``[]`` or all-empty rows: the base model alone.

        The layout and each layer's ``A_u``, ``B_u`` are kept for the last few row sets, so
        alternating between the same batches costs a lookup.
        """
        key = tuple(tuple(sorted(row.items())) for row in slot_rows)
        with self._lock:
            prepared = self._prepared.get(key, False)
            if prepared is False:
                plan = self._layout(list(slot_rows))
                prepared = None
                if plan is not None:
                    prepared = {name: layer.prepare(plan) for name, layer in self.layers.items()}
                self._prepared[key] = prepared
                while len(self._prepared) > _PREPARED:
                    self._prepared.popitem(last=False)
            self._prepared.move_to_end(key)
            for name, layer in self.layers.items():
                if prepared is None:
                    layer.clear_mixture()
                else:
                    layer.set_mixture(prepared[name])

    def _resolve(self, ref: AdapterRef, source: ParsedSource | None) -> int:
        """The slot of ``ref``, pinned, so loading the batch's next adapter cannot evict it."""
        if source is not None:
            return self._acquire(ref, source, pin=True)  # loads outside the lock
        with self._lock:
            if ref not in self._index:
                raise AdapterNotLoaded(
                    f"{adapter_name(ref)} is not loaded; load it or pass a loader"
                )
            self._index.move_to_end(ref)
            slot = self._index[ref]
            self._pins[slot] += 1
            return slot

    def _layout(self, slot_rows: list[dict[int, float]]) -> MixturePlan | None:
        """Lay a batch of resolved, pinned rows out for the layers; None for a base-only batch."""
        if not any(slot_rows):
            return None
        unique = sorted({s for row in slot_rows for s in row})
        column = {s: j for j, s in enumerate(unique)}
        scale_dtype = next(iter(self.layers.values())).scale.dtype  # w like s: fp32 or fp64
        weights = torch.zeros(len(slot_rows), len(unique), dtype=scale_dtype)
        for b, row in enumerate(slot_rows):
            for slot, w in row.items():
                weights[b, column[slot]] = w
        layer = next(iter(self.layers.values()))
        device, dtype = layer.lora_A.device, layer.lora_A.dtype
        rank = max(self._ranks.get(s, 1) for s in unique)  # an evicted slot: zeros
        slots = torch.tensor(unique, device=device)
        if all(row == slot_rows[0] for row in slot_rows):
            return MixturePlan(slots, rank, weights[:1].to(device), True, None, None, None)
        k = max(len(row) for row in slot_rows)
        index = torch.zeros(len(slot_rows), k, dtype=torch.long)
        index_weights = torch.zeros(len(slot_rows), k, dtype=weights.dtype)
        for b, row in enumerate(slot_rows):
            for j, (slot, w) in enumerate(row.items()):
                index[b, j], index_weights[b, j] = column[slot], w
        lanes = weights.repeat_interleave(rank, dim=1)[:, None, :]  # (B, 1, U·r)
        lanes, index_weights = lanes.to(device, dtype), index_weights.to(device, dtype)
        return MixturePlan(
            slots, rank, weights.to(device), False, lanes, index.to(device), index_weights
        )

    def _check_finite(self, slot_rows: list[dict[int, float]], first: int = 0) -> None:
        """Refuse deltas that would overflow the dtype, as peft's safe_merge does, but from
        bounds kept at load time: no tensor op, so no cost per layer per batch."""
        dtype = next(iter(self.layers.values())).lora_B.dtype
        for b, row in enumerate(slot_rows):
            for slot, w in row.items():
                # an evicted (zeroed) slot has no bound left: it adds nothing
                if not w * self._bounds.get(slot, 0.0) < torch.finfo(dtype).max:
                    raise InvalidMixture(
                        f"mixture row {first + b}: weight {w} makes the composed LoRA delta overflow "
                        f"{dtype}; lower the weight"
                    )
