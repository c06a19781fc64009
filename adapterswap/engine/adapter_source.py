"""Reading published adapter versions from storage, by :class:`AdapterRef`. No Ray here.

Weights load from ``adapter_model.safetensors`` only (bytes through ``pyarrow.fs``, parsed
by safetensors: no pickle). Every version's manifest is checked against the replica's base
model first: an adapter trained on another base is refused.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from adapterswap.route.stats import ShardStats, load_shard_stats
from adapterswap.storage.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ROUTER_STATS
from adapterswap.storage.fs import read_bytes
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import read_manifest
from adapterswap.types import AdapterRef


class StorageAdapterSource:
    """Loads adapters and router statistics of published versions from storage."""

    def __init__(self, layout: StorageLayout, base_model_hash: str) -> None:
        self.layout = layout
        self.base_model_hash = base_model_hash

    def load(self, ref: AdapterRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The version's LoRA state dict and peft config (an ``AdapterBank`` loader)."""
        loc = self.layout.version(ref)
        read_manifest(loc).check_base_model(self.base_model_hash)
        config = json.loads(read_bytes(loc.child(ADAPTER_CONFIG)))
        state = load_safetensors(read_bytes(loc.child(ADAPTER_WEIGHTS)))
        return state, config

    def router_stats(self, ref: AdapterRef) -> ShardStats:
        """The version's routing statistics, read from storage (the gateway's routing index
        holds them, so nothing here keeps a second copy)."""
        return load_shard_stats(read_bytes(self.layout.version(ref).child(ROUTER_STATS)))
