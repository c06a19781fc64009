"""The host tier of a replica's adapters: parsed, validated LoRA tensors in host memory, an
LRU bounded in bytes. No Ray here.

Bank slots (the model's device) ← this cache ← storage. An entry is what
:func:`~adapterswap.compose.adapter_files.parse_adapter` returns for the bank's layers, so
installing it into a slot is a copy, with no file read and no check left to do. On CUDA its
tensors sit in pinned (page-locked) memory, which the copy to the device reads fastest.
Thread-safe: prefetch workers put, the engine's thread gets, a revocation drops.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

from adapterswap.compose.bank import ParsedAdapter
from adapterswap.types import AdapterRef


def parsed_bytes(parsed: ParsedAdapter) -> int:
    """Bytes of an adapter's tensors (A and B of every module)."""
    return sum(a.nbytes + b.nbytes for a, b, _ in parsed.values())


def host_copy(parsed: ParsedAdapter, *, pin: bool) -> ParsedAdapter:
    """A copy of ``parsed`` in memory of its own: pinned when ``pin`` (a model on CUDA),
    plain otherwise. Parsed tensors may view the bytes they were read from; a copy can be
    zeroed when its version is revoked."""
    copy = (
        (lambda t: t.pin_memory())
        if pin
        else (lambda t: t.clone(memory_format=torch.contiguous_format))
    )
    return {m: (copy(a), copy(b), s) for m, (a, b, s) in parsed.items()}


def zero(parsed: ParsedAdapter) -> None:
    """Overwrite an adapter's tensors with zeros (a revoked version's copy)."""
    for a, b, _ in parsed.values():
        a.zero_()
        b.zero_()


class HostCache:
    """Parsed adapters by :class:`AdapterRef`, least recently used evicted past ``capacity``
    bytes. ``evictions`` counts LRU evictions (a drop by revocation is not one)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0  # bytes of the entries held
        self.evictions = 0
        self._entries: OrderedDict[AdapterRef, tuple[ParsedAdapter, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, ref: AdapterRef) -> bool:
        with self._lock:
            return ref in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def refs(self) -> list[AdapterRef]:
        """The entries, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, ref: AdapterRef) -> ParsedAdapter | None:
        """The entry (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None:
                return None
            self._entries.move_to_end(ref)
            return entry[0]

    def put(self, ref: AdapterRef, parsed: ParsedAdapter) -> bool:
        """Hold ``parsed`` (replacing an entry of ``ref``), evicting the least recently used
        entries until it fits. False, holding nothing, when it alone exceeds the capacity."""
        size = parsed_bytes(parsed)
        if size > self.capacity:
            return False
        with self._lock:
            old = self._entries.pop(ref, None)
            if old is not None:
                self.used -= old[1]
            while self.used + size > self.capacity:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.used -= evicted
                self.evictions += 1
            self._entries[ref] = (parsed, size)
            self.used += size
            return True

    def drop_except(self, keep: Iterable[AdapterRef]) -> list[AdapterRef]:
        """Drop every entry not in ``keep`` (revoked versions) and zero its tensors, as the
        bank zeroes a revoked slot: no copy of a revoked adapter stays in memory. Returns
        what was dropped."""
        keep = set(keep)
        with self._lock:
            dropped = [ref for ref in self._entries if ref not in keep]
            for ref in dropped:
                parsed, size = self._entries.pop(ref)
                self.used -= size
                zero(parsed)
            return dropped
