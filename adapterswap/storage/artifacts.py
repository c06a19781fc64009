"""Adapter version artifacts: the files of one version, in its directory (see ``layout``).

    adapters/<adapter_id>/v<version>/
        adapter_config.json          peft's config: PeftModel.from_pretrained(base, dir) loads it
        README.md                    its model card: the base model's hub id and content hash
        adapter_model.safetensors    the LoRA A and B matrices (safetensors only, never pickle)
        router_stats.safetensors     the shard's own routing statistics
        manifest.json                what the version is and what it saw; written last

Files go through ``pyarrow.fs``, so the same code writes a local directory or an S3
prefix. ``manifest.json`` is written last: a directory without it is an interrupted write.
A copied directory loads on another machine: the peft config names the base model as the
manifest does (a hub id, never a local path), and the model card carries its content hash.
Nothing here registers anything; publishing (the store transaction) comes after all files
are in place, so a crash before it leaves the previous version serving and these files
as orphans for :func:`adapterswap.storage.purge.sweep_orphans`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from adapterswap.storage.fs import Location, read_bytes, write_atomic
from adapterswap.storage.manifest import MANIFEST, AdapterManifest, BaseModelId

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CARD = "README.md"
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
        config = _portable_config((Path(tmp) / ADAPTER_CONFIG).read_bytes(), manifest.base_model)
        weights = (Path(tmp) / ADAPTER_WEIGHTS).read_bytes()
    write_atomic(loc.child(ADAPTER_CONFIG), config, durable=True)
    write_atomic(loc.child(ADAPTER_WEIGHTS), weights, durable=True)
    write_atomic(loc.child(MODEL_CARD), _model_card(manifest), durable=True)
    write_atomic(loc.child(ROUTER_STATS), router_stats, durable=True)
    write_atomic(loc.child(MANIFEST), manifest.encode(), durable=True)


def _portable_config(raw: bytes, base: BaseModelId) -> bytes:
    """peft's config naming the base model as ``base`` does: peft itself records the loaded
    model's name_or_path, a directory of this machine for any model not loaded by hub id."""
    config = {**json.loads(raw), "base_model_name_or_path": base.peft_name}
    return json.dumps(config, indent=2, sort_keys=True).encode()


def _model_card(manifest: AdapterManifest) -> bytes:
    """A model card as the hub reads it: YAML metadata (JSON values are YAML), then text.
    ``base_model`` must be a hub id, so it is there only when the base has one."""
    base = manifest.base_model
    meta = {
        **({"base_model": base.hub_id} if base.hub_id else {}),
        "library_name": "peft",
        "tags": ["lora", "adapterswap"],
        "adapterswap": {
            "adapter": manifest.adapter_id,
            "version": manifest.version,
            "base_model": {"id": base.id, "sha256": base.hash},
        },
    }
    front = "\n".join(f"{key}: {json.dumps(value)}" for key, value in meta.items())
    hub = f" (on the hub: `{base.hub_id}`)" if base.hub_id not in (None, base.id) else ""
    auto = "`AutoPeftModelForCausalLM.from_pretrained(dir)`, or " if base.hub_id else ""
    text = (
        f"# {manifest.adapter_id} v{manifest.version}\n\n"
        f"A LoRA adapter trained by AdapterSwap on the base model `{base.id}`{hub}, whose "
        f"content hash is `{base.hash}` (AdapterSwap refuses it on any other base). Load it "
        f"with {auto}`PeftModel.from_pretrained(base, dir)` on a base you load.\n"
    )
    return f"---\n{front}\n---\n\n{text}".encode()


def download_version(
    loc: Location, target: Path, names: Sequence[str] = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
) -> Path:
    """Copy a version's peft files to a local directory (for PeftModel.from_pretrained)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).write_bytes(read_bytes(loc.child(name)))
    return target
