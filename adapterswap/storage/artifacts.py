"""Adapter version artifacts: the files of one version, in its directory (see ``layout``).

    adapters/<adapter_id>/v<version>/
        adapter_config.json          peft's config: PeftModel.from_pretrained(base, dir) loads it
        adapter_model.safetensors    the LoRA A and B matrices (safetensors only, never pickle)
        router_stats.safetensors     the shard's own routing statistics
        manifest.json                what the version is and what it saw; written last

Files go through ``pyarrow.fs``, so the same code writes a local directory or an S3
prefix. ``manifest.json`` is written last: a directory without it is an interrupted write.
Nothing here registers anything; publishing (the store transaction) comes after all files
are in place, so a crash before it leaves the previous version serving and these files
as orphans for :func:`adapterswap.storage.purge.sweep_orphans`.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from adapterswap.storage.fs import Location, read_bytes, write_atomic
from adapterswap.storage.manifest import MANIFEST, AdapterManifest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROUTER_STATS = "router_stats.safetensors"


def training_data_hash(docs: Iterable[tuple[str, str]]) -> str:
    """A hash of exactly what a shard trains on: its (doc id, content hash) pairs, sorted."""
    digest = hashlib.sha256()
    for doc_id, content in sorted(docs):
        digest.update(f"{doc_id}\0{content}\n".encode())
    return "sha256:" + digest.hexdigest()


def write_adapter_version(
    loc: Location, peft_model: Any, router_stats: bytes, manifest: AdapterManifest
) -> None:
    """Write a version's files durably, manifest last. Overwrites leftovers of an
    interrupted write."""
    loc.fs.delete_dir_contents(loc.path, missing_dir_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            write_atomic(loc.child(name), (Path(tmp) / name).read_bytes(), durable=True)
    write_atomic(loc.child(ROUTER_STATS), router_stats, durable=True)
    write_atomic(loc.child(MANIFEST), manifest.encode(), durable=True)


def download_version(
    loc: Location, target: Path, names: Sequence[str] = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
) -> Path:
    """Copy a version's peft files to a local directory (for PeftModel.from_pretrained)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).write_bytes(read_bytes(loc.child(name)))
    return target
