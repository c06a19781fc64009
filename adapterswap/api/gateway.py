"""The Gateway, everything the HTTP endpoints do, and :func:`build_gateway`. No Ray here.

The FastAPI app (``api/app.py``) is a thin layer over a :class:`Gateway`, which joins the
inference endpoints (``api/inference.py``), the tokenizer's (``api/tokenizer.py``) and the
admin ones (``api/admin.py``) over the same collaborators. :func:`build_gateway` wires those collaborators from a store, a model
client and an adapter source; the Ray Serve ingress (``actors/deployments.py``) and the
tests' in-process app (``tests/support.py``) both build their gateway with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterswap.api.admin import AdminEndpoints
from adapterswap.api.auth import Authenticator
from adapterswap.api.inference import InferenceEndpoints
from adapterswap.api.model_client import ModelClient
from adapterswap.api.tokenizer import TokenizerEndpoints
from adapterswap.config import AdapterSwapConfig
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.models.embedder import load_embedder
from adapterswap.route.active_set import ActiveSet
from adapterswap.route.index import RoutingIndex
from adapterswap.store.jobs import Jobs
from adapterswap.store.protocol import Store
from adapterswap.types import Embed


class Gateway(InferenceEndpoints, TokenizerEndpoints, AdminEndpoints):
    """Everything the HTTP endpoints do, given its collaborators."""

    def __init__(
        self,
        config: AdapterSwapConfig,
        *,
        model: ModelClient,
        model_id: str,
        tokenizer: Any,
        authenticator: Authenticator,
        active: ActiveSet,
        index: RoutingIndex,
        embed: Embed,
        store: Store,
        jobs: Jobs,
        on_routed: Callable[[float, float, int], None] | None = None,
        replica_alive: Callable[[str], bool] | None = None,
    ) -> None:
        """``store`` is the registry itself or the store actor's client.

        ``replica_alive`` is the deletion barrier's oracle: is this registered model replica
        still alive? The Ray Serve ingress passes one that asks Serve's controller. None:
        every registered replica counts until it unregisters (one process, tests), so a
        replica is never dropped for being slow.
        """
        self.config = config
        self.model = model
        self.model_id = model_id
        self.tokenizer = tokenizer  # the base model's: token-id prompts, /tokenize
        self.auth = authenticator
        self.active = active
        self.index = index
        self._embed = embed
        self.store = store
        self.jobs = jobs
        self._on_routed = on_routed  # (total ms, scoring ms, adapters): metrics, under Ray
        self.replica_alive = replica_alive


def build_gateway(
    config: AdapterSwapConfig,
    *,
    store: Store,
    model: ModelClient,
    model_id: str,
    tokenizer: Any,
    adapters: StorageAdapterSource,
    jobs: Jobs,
    embed: Embed | None = None,
    authenticator: Authenticator | None = None,
    on_routed: Callable[[float, float, int], None] | None = None,
    replica_alive: Callable[[str], bool] | None = None,
) -> Gateway:
    """A gateway whose store reads (keys, the active set) all go through ``store``.

    ``tokenizer`` is the base model's (``models.base.load_tokenizer``). ``adapters`` reads
    the routing index its per-shard statistics; the index drops those of versions that left
    the active set when the gateway syncs (by deltas). ``embed`` defaults to
    ``config.embedding``'s embedder;
    ``authenticator`` to the server's, with ``config.serve``'s key caches and the store's
    list of key ids (see :mod:`adapterswap.api.auth`).
    """
    serving = config.serve
    if authenticator is None:
        authenticator = Authenticator(
            store.lookup_key,
            serving.key_cache_ttl_s,
            negative_ttl_s=serving.negative_key_cache_ttl_s,
            negative_cache_size=serving.negative_key_cache_size,
            key_ids=lambda: [k.key_id for k in store.list_keys() if not k.revoked],
        )
    index = RoutingIndex(adapters.router_stats)
    return Gateway(
        config,
        model=model,
        model_id=model_id,
        tokenizer=tokenizer,
        authenticator=authenticator,
        active=ActiveSet(
            store.active_snapshot, index.retain, epoch=store.epoch, changes=store.active_changes
        ),
        index=index,
        embed=embed or load_embedder(config.embedding).embed,
        store=store,
        jobs=jobs,
        on_routed=on_routed,
        replica_alive=replica_alive,
    )
