"""The small value types every stage passes around: adapter references and versions, the
caller's principal, a mixture of adapters, an embedding function.

Only plain values live here (no I/O, no behaviour beyond a property), so any stage may import
this module without pulling in the store, the model or the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


@dataclass(frozen=True, order=True)
class AdapterRef:
    """THE canonical reference to one adapter version, used everywhere."""

    id: str
    version: int


class AdapterStatus(StrEnum):
    """Where an adapter version is in its life (the store's module docstring has the moves)."""

    TRAINING = "training"
    ACTIVE = "active"
    REVOKED = "revoked"
    FAILED = "failed"
    PURGED = "purged"


@dataclass(frozen=True)
class AdapterVersion:
    """One adapter version as stored. The adapter id is its shard id."""

    adapter_id: str
    version: int
    shard: str
    group: str
    status: AdapterStatus
    uri: str
    doc_count: int
    created_at: str
    updated_at: str

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.adapter_id, self.version)


@dataclass(frozen=True)
class ActiveChanges:
    """How the active set moved from epoch ``since`` to ``epoch``, read in one snapshot.

    ``added``: the versions active at ``epoch`` that entered the set after ``since``;
    ``removed``: the versions that left it after ``since``. Either may hold a few versions
    that changed in the transaction that produced ``since`` itself (see migration 3):
    applying a change the view already holds changes nothing, so a view at any epoch from
    ``since`` to ``epoch`` that drops ``removed`` and then sets ``added`` is the set at
    ``epoch``. No version is in both.
    """

    since: int
    epoch: int
    added: tuple[AdapterVersion, ...]
    removed: tuple[AdapterRef, ...]


@dataclass(frozen=True)
class Principal:
    """Who a valid key belongs to. ``groups`` is sorted and free of duplicates."""

    key_id: str
    user: str
    groups: tuple[str, ...]
    admin: bool


# The adapters one request composes, each with its weight: ((ref, weight), ...).
Mixture = tuple[tuple[AdapterRef, float], ...]

# Texts in, one embedding per text out: (len(texts), dim) float32.
Embed = Callable[[Sequence[str]], np.ndarray]
