"""Adapter version artifacts: one directory per (adapter id, version) under ``<storage>/adapters``.

    adapters/<adapter_id>/v<version>/
        adapter_config.json          peft's config: PeftModel.from_pretrained(base, dir) loads it
        adapter_model.safetensors    the LoRA A and B matrices (safetensors only, never pickle)
        router_stats.safetensors     the shard's own routing statistics
        manifest.json                what the version is and what it saw; written last

Files go through ``pyarrow.fs``, so the same code writes a local directory or an S3
prefix. ``manifest.json`` is written last: a directory without it is an interrupted write.
Nothing here registers anything; publishing (the store transaction) comes after all files
are in place, so a crash before it leaves the previous version serving and these files
as orphans for :func:`sweep_orphans`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from adapterswap.errors import AdapterSwapError
from adapterswap.storage.fs import Location, read_bytes, resolve, write_bytes_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROUTER_STATS = "router_stats.safetensors"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
VERSION_DIR = re.compile(r"v\d+")


class BaseModelMismatch(AdapterSwapError):
    """An adapter was trained on another base model than the one it is being used with."""


def adapters_root(storage_uri: str) -> Location:
    return resolve(storage_uri).child("adapters")


def version_location(storage_uri: str, adapter_id: str, version: int) -> Location:
    return adapters_root(storage_uri).child(adapter_id, f"v{version}")


def location_uri(storage_uri: str, loc: Location) -> str:
    """The URI recorded in the store for a location: a plain path locally, s3://... otherwise."""
    return loc.path if loc.is_local else f"{storage_uri.split('://', 1)[0]}://{loc.path}"


def training_data_hash(docs: Iterable[tuple[str, str]]) -> str:
    """A hash of exactly what a shard trains on: its (doc id, content hash) pairs, sorted."""
    digest = hashlib.sha256()
    for doc_id, content in sorted(docs):
        digest.update(f"{doc_id}\0{content}\n".encode())
    return "sha256:" + digest.hexdigest()


def write_adapter_version(
    loc: Location, peft_model: Any, router_stats: bytes, manifest: dict[str, Any]
) -> None:
    """Write a version's files, manifest last. Overwrites leftovers of an interrupted write."""
    loc.fs.delete_dir_contents(loc.path, missing_dir_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            write_bytes_atomic(loc.child(name), (Path(tmp) / name).read_bytes())
    write_bytes_atomic(loc.child(ROUTER_STATS), router_stats)
    body = json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2, sort_keys=True)
    write_bytes_atomic(loc.child(MANIFEST), body.encode())


def read_manifest(loc: Location) -> dict[str, Any]:
    return json.loads(read_bytes(loc.child(MANIFEST)))


def check_base_model(manifest: dict[str, Any], base_model_hash: str) -> None:
    """Refuse an adapter trained on a different base model than ``base_model_hash``."""
    trained_on = manifest["base_model"]
    if trained_on["hash"] != base_model_hash:
        raise BaseModelMismatch(
            f"adapter {manifest['adapter_id']} v{manifest['version']} was trained on base model "
            f"{trained_on['id']} ({trained_on['hash'][:19]}...), not on the loaded one "
            f"({base_model_hash[:19]}...): retrain it or load its base model"
        )


def download_version(
    loc: Location, target: Path, names: Sequence[str] = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
) -> Path:
    """Copy a version's peft files to a local directory (for PeftModel.from_pretrained)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).write_bytes(read_bytes(loc.child(name)))
    return target


def list_version_dirs(storage_uri: str) -> list[tuple[str, int, Location]]:
    """Every (adapter id, version, location) present in storage, complete or not, sorted."""
    root = adapters_root(storage_uri)
    selector = pafs.FileSelector(root.path, allow_not_found=True, recursive=True)
    found: dict[tuple[str, int], Location] = {}
    for info in root.fs.get_file_info(selector):
        parts = posixpath.relpath(info.path, root.path).split("/")
        if info.type == pafs.FileType.File and len(parts) == 3 and VERSION_DIR.fullmatch(parts[1]):
            found[(parts[0], int(parts[1][1:]))] = root.child(parts[0], parts[1])
    return [(adapter_id, version, loc) for (adapter_id, version), loc in sorted(found.items())]


def delete_version(loc: Location) -> None:
    """Delete a version directory and everything in it (a no-op when it is already gone)."""
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
        loc.fs.delete_dir(loc.path)


def sweep_orphans(storage_uri: str, known: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """Delete version directories the store does not know (interrupted publishes)."""
    swept = []
    for adapter_id, version, loc in list_version_dirs(storage_uri):
        if (adapter_id, version) not in known:
            delete_version(loc)
            swept.append((adapter_id, version))
    return swept
