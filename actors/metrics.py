"""Prometheus metrics of the serving path, exported through Ray's metrics endpoint.

Ray Serve's own metrics (request counts, latencies, replica states) come for free; these
add what is specific to AdapterSwap. Names below appear with Ray's ``ray_`` prefix:

- ``adapterswap_adapter_cache_hits`` / ``..._misses``: adapter lookups a model replica's
  bank served from memory / had to load from storage;
- ``adapterswap_adapters_per_request``: how many adapters a request composed;
- ``adapterswap_router_latency_ms``: embedding the query and scoring the visible shards;
- ``adapterswap_composition_setup_ms``: resolving and pinning a batch's mixture before it runs.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 250, 1000]


class ServeMetrics:
    """The metric objects; create one per replica (ingress or model)."""

    def __init__(self) -> None:
        self.cache_hits = Counter(
            "adapterswap_adapter_cache_hits", "Adapter lookups served from the bank."
        )
        self.cache_misses = Counter(
            "adapterswap_adapter_cache_misses", "Adapters loaded from storage."
        )
        self.adapters_per_request = Histogram(
            "adapterswap_adapters_per_request",
            "Adapters composed per request.",
            [0.5, 1.5, 2.5, 3.5, 5.5, 8.5, 16.5],
        )
        self.router_ms = Histogram(
            "adapterswap_router_latency_ms", "Routing time per request.", _MS
        )
        self.composition_ms = Histogram(
            "adapterswap_composition_setup_ms", "Mixture setup per batch.", _MS
        )

    def record_routing(self, milliseconds: float, adapters: int) -> None:
        self.router_ms.observe(milliseconds)
        self.adapters_per_request.observe(adapters)

    def record_batch(self, hits: int, misses: int, composition_ms: float) -> None:
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)
        self.composition_ms.observe(composition_ms)
