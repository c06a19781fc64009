"""Prometheus metrics of the serving path, exported through Ray's metrics endpoint.

Ray Serve's own metrics (request counts, latencies, replica states) come for free; these
add what is specific to AdapterSwap. Names below appear with Ray's ``ray_`` prefix:

- ``adapterswap_adapter_cache_hits`` / ``..._misses``: adapter lookups a model replica's
  bank served from memory / had to load from storage;
- ``adapterswap_adapters_per_request``: how many adapters a request composed;
- ``adapterswap_router_latency_ms``: embedding the query and scoring the visible shards;
  ``adapterswap_router_scoring_ms``: the scoring and the choice alone (the routing index);
- ``adapterswap_engine_queued_requests`` / ``..._running_rows``: a model replica's engine
  queue and batch, set whenever a request arrives or completes;
- ``adapterswap_queue_time_ms``, ``adapterswap_time_to_first_token_ms``,
  ``adapterswap_inter_token_latency_ms``: per completed generation, from its arrival at the
  engine (the inter-token latency is its decode time over its tokens after the first);
- ``adapterswap_generated_tokens``: tokens the engine sampled, a cancelled row's included
  (its rate is tokens/s), counted whenever a request arrives or completes. The engine reserves
  a row's whole KV cache when the row joins, so it never preempts a row: there is no
  preemption count;
- ``adapterswap_composition_setup_ms``: setting the per-row mixture plans of an engine step
  (observed when a generation request completes; near zero while the rows do not change);
- ``adapterswap_admission_deferred`` (label ``reason``): requests that waited in the queue
  while later ones could join, once per reason: ``adapters_loading`` (prefetch from storage
  not finished) or ``bank_full`` (their adapters would not fit in the bank beside the
  running rows');
- ``adapterswap_adapter_tier_bytes`` / ``..._entries`` (label ``tier``: ``bank``, ``host``):
  adapters each tier holds; ``adapterswap_adapter_tier_hits`` / ``..._misses`` /
  ``..._evictions`` (same label): lookups a tier answered or not, and its LRU evictions
  (the host tier's lookups are a queued request's adapters not in the bank);
- ``adapterswap_adapter_load_failures``: adapter loads that failed (files corrupt or
  missing, storage down); which ones, ``adapterswap status`` says.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from adapterswap.engine.adapter_tiers import TierStats
from adapterswap.engine.loop import EngineStats
from adapterswap.engine.requests import GenerationResult

_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 250, 1000]
_LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


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
        self.scoring_ms = Histogram(
            "adapterswap_router_scoring_ms",
            "Scoring the visible shards and choosing, per request (no embedding).",
            _MS,
        )
        self.composition_ms = Histogram(
            "adapterswap_composition_setup_ms", "Mixture setup per engine step.", _MS
        )
        self.queued = Gauge("adapterswap_engine_queued_requests", "Requests waiting to join.")
        self.running = Gauge("adapterswap_engine_running_rows", "Rows in the engine's batch.")
        self.queue_ms = Histogram(
            "adapterswap_queue_time_ms", "Arrival to a place in the batch.", _LATENCY_MS
        )
        self.ttft_ms = Histogram(
            "adapterswap_time_to_first_token_ms", "Arrival to the first token.", _LATENCY_MS
        )
        self.itl_ms = Histogram(
            "adapterswap_inter_token_latency_ms", "Decode time per token after the first.", _MS
        )
        self.tokens = Counter("adapterswap_generated_tokens", "Tokens sampled.")
        self.deferred = Counter(
            "adapterswap_admission_deferred",
            "Requests that waited to join while later ones could.",
            tag_keys=("reason",),
        )
        self.tier_bytes = Gauge(
            "adapterswap_adapter_tier_bytes", "Bytes of adapters held.", tag_keys=("tier",)
        )
        self.tier_entries = Gauge(
            "adapterswap_adapter_tier_entries", "Adapters held.", tag_keys=("tier",)
        )
        self.tier_counters = {
            kind: Counter(
                f"adapterswap_adapter_tier_{kind}", f"Adapter {what}.", tag_keys=("tier",)
            )
            for kind, what in (
                ("hits", "lookups found in the tier"),
                ("misses", "lookups not found in the tier"),
                ("evictions", "evicted to make room (LRU)"),
            )
        }
        self.load_failures = Counter(
            "adapterswap_adapter_load_failures", "Adapter loads that failed."
        )
        # Cumulative counts as last seen, so each export adds what changed since.
        self._sampled = 0  # the engine's tokens_sampled when last counted
        self._seen: dict[str, int] = {}

    def record_routing(self, milliseconds: float, scoring_ms: float, adapters: int) -> None:
        self.router_ms.observe(milliseconds)
        self.scoring_ms.observe(scoring_ms)
        self.adapters_per_request.observe(adapters)

    def record_composition(self, milliseconds: float) -> None:
        self.composition_ms.observe(milliseconds)

    def record_lookups(self, hits: int, misses: int) -> None:
        """What the replica's cumulative adapter lookups (per request, at admission) gained
        since the last call: requests whose lifetimes overlap count each lookup once."""
        self._add(self.cache_hits, "lookup_hits", hits)
        self._add(self.cache_misses, "lookup_misses", misses)

    def record_engine(self, stats: EngineStats) -> None:
        self.queued.set(stats.queued)
        self.running.set(stats.running)
        if stats.tokens_sampled > self._sampled:
            self.tokens.inc(stats.tokens_sampled - self._sampled)
        self._sampled = stats.tokens_sampled
        self._add(
            self.deferred, "adapters_loading", stats.deferred_loading, reason="adapters_loading"
        )
        self._add(self.deferred, "bank_full", stats.deferred_bank_full, reason="bank_full")

    def record_tiers(self, stats: TierStats) -> None:
        """Both adapter tiers' gauges, and what their counters gained since the last call."""
        for tier in ("bank", "host"):
            self.tier_bytes.set(getattr(stats, f"{tier}_bytes"), tags={"tier": tier})
            self.tier_entries.set(getattr(stats, f"{tier}_entries"), tags={"tier": tier})
            for kind, counter in self.tier_counters.items():
                key = f"{tier}_{kind}"
                self._add(counter, key, getattr(stats, key), tier=tier)
        self._add(self.load_failures, "load_failures", stats.load_failures)

    def _add(self, counter: Counter, key: str, total: int, **tags: str) -> None:
        """Increment ``counter`` by what the cumulative ``total`` gained since last seen."""
        gained = total - self._seen.get(key, 0)
        if gained > 0:
            counter.inc(gained, tags=tags or None)
        self._seen[key] = total

    def record_generation(self, result: GenerationResult) -> None:
        """A completed generation's timings (a failed one has none)."""
        if result.queue_s is not None:
            self.queue_ms.observe(1000 * result.queue_s)
        if result.first_token_s is None:
            return
        self.ttft_ms.observe(1000 * result.first_token_s)
        if result.completion_tokens > 1 and result.finish_s is not None:
            decode = result.finish_s - result.first_token_s
            self.itl_ms.observe(1000 * decode / (result.completion_tokens - 1))
