"""Purging adapter versions from storage: one version's files and checkpoints, then its record.

Used wherever a version must go for good: a training run that failed or was interrupted,
a deletion's revoked versions, and version directories the store never heard of.
"""

from __future__ import annotations

from typing import Protocol

from adapterswap.storage.fs import delete_dir
from adapterswap.storage.layout import StorageLayout
from adapterswap.types import AdapterRef


class PurgeRecords(Protocol):
    """The store's side of a purge (the registry, or a client of the store actor)."""

    def purge(self, adapter_id: str, version: int, *, actor: str) -> object: ...


def purge_version(
    layout: StorageLayout, store: PurgeRecords, ref: AdapterRef, *, actor: str
) -> None:
    """Delete a failed or revoked version's files and Ray Train checkpoints (both derive from
    its documents), then mark it purged in the store.

    The record goes last, so ``purged`` always means the files are gone: a crash in between
    leaves the version failed or revoked (never servable), and purging it again finishes
    (each delete is a no-op once done).
    """
    delete_dir(layout.version(ref))
    delete_dir(layout.checkpoints(ref))
    store.purge(ref.id, ref.version, actor=actor)


def sweep_orphans(layout: StorageLayout, known: set[AdapterRef]) -> list[AdapterRef]:
    """Delete the version directories the store does not know (interrupted publishes)."""
    swept = []
    for ref, loc in layout.versions_present():
        if ref not in known:
            delete_dir(loc)
            swept.append(ref)
    return swept
