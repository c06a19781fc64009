"""A replica's adapters in tiers: bank slots ← a host cache of parsed tensors ← storage, with
prefetch on a small pool of threads. No Ray here.

- **Prefetch.** When a request is queued, :meth:`AdapterTiers.prefetch` starts loading each
  adapter it names that is in neither tier: read from storage, validated against the bank's
  layers and copied into host memory (pinned on CUDA) on a pool thread, with no lock of the
  bank held, while the engine's running rows keep decoding.
- **Install.** At admission the engine asks :meth:`ready`: the row's missing adapters'
  tensors if every one is in the host tier, None while one still loads (the row waits; a
  finished load wakes the engine). :meth:`pin` then copies them into bank slots under the
  bank's lock.
- **Revocation.** :meth:`drop` (the active set's ``on_drop``) records the versions a
  replica may serve, then drops every other one from the host tier (zeroed) and the bank. A
  load is put in the host tier only if its version is still in that set when it finishes,
  and an install checks it again, so a version revoked while it loads is never installed;
  the engine stops any row that holds one before it samples (see ``ModelReplica``).
- **Failures.** A load that fails (files corrupt or missing, another base model, storage
  down) fails only the requests that need that version, with :class:`AdapterLoadFailed`,
  which names nothing. It is remembered: for ``retry_s`` every request needing it fails at
  once, without reading storage again; the next request after that tries again. A time
  backoff rather than a retry when the epoch moves: a published version's files never
  change (a new version is a new directory), so an epoch move says nothing about them, and
  what can heal by itself (storage unreachable, throttled) heals with time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from adapterswap.compose.adapter_files import adapter_name, parse_adapter
from adapterswap.compose.bank import AdapterBank, ParsedAdapter
from adapterswap.engine.host_cache import HostCache, host_copy, parsed_bytes, zero
from adapterswap.errors import AdapterLoadFailed, StaleMixture
from adapterswap.types import AdapterRef, Mixture

logger = logging.getLogger("adapterswap.tiers")

LOAD_FAILED = (
    "an adapter this request needs could not be loaded on the model replica; the server "
    "logged the details"
)


class AdapterReader(Protocol):
    """Where adapters come from (``StorageAdapterSource``)."""

    def load(self, ref: AdapterRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The version's LoRA state dict and peft config."""
        ...


@dataclass(frozen=True)
class LoadFailure:
    """A version that failed to load, as the replica reports it to operators (never to a
    caller): what failed, when, and when a request may try it again."""

    ref: AdapterRef
    error: str  # the exception's type and message
    at: float  # Unix time of the last attempt
    attempts: int
    retry_at: float  # the tiers' clock (monotonic) from which a request tries again

    def report(self) -> dict[str, Any]:
        """The failure as the heartbeat's JSON carries it."""
        return {
            "adapter_id": self.ref.id,
            "version": self.ref.version,
            "error": self.error,
            "at": self.at,
            "attempts": self.attempts,
        }


@dataclass(frozen=True)
class TierStats:
    """Each tier's contents (gauges) and lookups (counters, since the replica started)."""

    bank_bytes: int
    bank_entries: int
    bank_hits: int
    bank_misses: int
    bank_evictions: int
    host_bytes: int
    host_entries: int
    host_hits: int
    host_misses: int
    host_evictions: int
    load_failures: int


class AdapterTiers:
    """The bank and its host tier for one replica; thread-safe."""

    def __init__(
        self,
        bank: AdapterBank,
        host: HostCache,
        source: AdapterReader,
        *,
        workers: int = 2,
        retry_s: float = 30.0,
        pin_memory: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``source.load(ref)`` reads storage (on a pool thread); ``pin_memory``: host
        tensors in pinned memory (a model on CUDA); ``clock`` times the retry backoff."""
        self.bank, self.host, self.source = bank, host, source
        self.retry_s, self._pin_memory, self._clock = retry_s, pin_memory, clock
        self.host_hits = self.host_misses = self.load_failures = 0
        # Called (no lock held) when a load finishes, e.g. to wake an engine whose rows wait.
        self.on_ready: Callable[[], None] | None = None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="adapterswap-prefetch")
        self._loading: dict[AdapterRef, Future[None]] = {}
        self._failed: dict[AdapterRef, LoadFailure] = {}
        self._keep: set[AdapterRef] | None = None  # servable versions; None: not told yet
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the pool: queued loads are dropped, a running one finishes unused."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests -------------------------------------------------------------------------

    def prefetch(self, refs: Iterable[AdapterRef]) -> None:
        """Start loading each of ``refs`` that is in neither tier into the host tier.

        Raises :class:`AdapterLoadFailed` for a version whose load failed within the last
        ``retry_s`` (the request fails at once), ``StaleMixture`` for one not servable.
        """
        for ref in refs:
            if ref in self.bank:
                continue
            with self._lock:
                if ref in self.host:
                    self.host_hits += 1
                    continue
                started = ref not in self._loading
                self._start(ref)  # raises for a version that failed or is not servable
                self.host_misses += started

    def ready(self, refs: Iterable[AdapterRef]) -> dict[AdapterRef, ParsedAdapter] | None:
        """The host tier's tensors of ``refs`` not in the bank, once all of them are there;
        None while one is loading (a load is started again for one the host tier evicted
        since its prefetch). Raises what :meth:`prefetch` raises."""
        parsed: dict[AdapterRef, ParsedAdapter] = {}
        waiting = False
        for ref in refs:
            if ref in self.bank:
                continue
            entry = self.host.get(ref)
            if entry is not None:
                parsed[ref] = entry
                continue
            with self._lock:
                self._start(ref)
            waiting = True
        return None if waiting else parsed

    def pin(self, mixture: Mixture, parsed: dict[AdapterRef, ParsedAdapter]) -> dict[int, float]:
        """Pin ``mixture``'s slots, copying the adapters missing from the bank from
        ``parsed`` (what :meth:`ready` returned). Raises ``StaleMixture`` for a version that
        is no longer servable, installing nothing of it."""

        def source(ref: AdapterRef) -> ParsedAdapter:
            with self._lock:
                self._check_servable(ref)
            entry = parsed.get(ref) or self.host.get(ref)
            if entry is None:  # evicted from the bank and the host tier since ready()
                raise StaleMixture(f"{adapter_name(ref)} left the cache; send the request again")
            return entry

        return self.bank.pin_from(mixture, source)

    def _start(self, ref: AdapterRef) -> None:
        """Load ``ref`` on the pool unless it is loading (the caller holds the lock)."""
        self._check_servable(ref)
        failure = self._failed.get(ref)
        if failure is not None and self._clock() < failure.retry_at:
            raise AdapterLoadFailed(LOAD_FAILED)
        if ref not in self._loading:
            self._loading[ref] = self._pool.submit(self._load, ref)

    def _check_servable(self, ref: AdapterRef) -> None:
        if self._keep is not None and ref not in self._keep:
            raise StaleMixture(f"adapter {ref.id!r} version {ref.version} is not active")

    # -- the pool ---------------------------------------------------------------------------

    def _load(self, ref: AdapterRef) -> None:
        """Read, validate and copy ``ref`` into host memory; keep it if still servable."""
        parsed: ParsedAdapter | None = None
        try:
            state, config = self.source.load(ref)
            parsed = host_copy(
                parse_adapter(ref, state, config, self.bank.layers), pin=self._pin_memory
            )
            error = None
        except Exception as exc:  # noqa: BLE001 - damaged files, another base, storage down
            logger.exception("could not load adapter %s v%s", ref.id, ref.version)
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._loading.pop(ref, None)
            if self._keep is not None and ref not in self._keep:
                zero(parsed or {})  # revoked while it loaded: never held, never installed
            elif error is not None:
                self._fail(ref, error)
            elif not self.host.put(ref, parsed):
                self._fail(
                    ref,
                    f"it needs {parsed_bytes(parsed)} bytes of host memory, over "
                    f"serve.host_cache_bytes={self.host.capacity}; raise it",
                )
            else:
                self._failed.pop(ref, None)
        if self.on_ready is not None:
            self.on_ready()

    def _fail(self, ref: AdapterRef, error: str) -> None:
        previous = self._failed.get(ref)
        self.load_failures += 1
        self._failed[ref] = LoadFailure(
            ref,
            error,
            time.time(),
            (previous.attempts if previous else 0) + 1,
            self._clock() + self.retry_s,
        )

    # -- revocation and reports ------------------------------------------------------------

    def drop(self, keep: set[AdapterRef]) -> list[AdapterRef]:
        """Serve only ``keep`` from now on: every other version leaves the host tier (zeroed)
        and the bank, a load of one in progress is discarded when it finishes, and its
        remembered failure is forgotten. Returns what the bank evicted."""
        with self._lock:
            self._keep = set(keep)
            self.host.drop_except(keep)
            self._failed = {r: f for r, f in self._failed.items() if r in keep}
        return self.bank.evict_all_except(keep)

    def failures(self) -> list[LoadFailure]:
        """Versions whose last load failed, by id."""
        with self._lock:
            return sorted(self._failed.values(), key=lambda f: f.ref)

    def loading(self) -> Sequence[AdapterRef]:
        """Versions being loaded now."""
        with self._lock:
            return list(self._loading)

    def stats(self) -> TierStats:
        """Both tiers' contents and counters, for metrics."""
        bank, host = self.bank, self.host
        return TierStats(
            bank.bytes_used,
            len(bank.loaded()),
            bank.hits,
            bank.misses,
            bank.evictions,
            host.used,
            len(host),
            self.host_hits,
            self.host_misses,
            host.evictions,
            self.load_failures,
        )
