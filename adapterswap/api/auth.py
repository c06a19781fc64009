"""Authentication: from a bearer key to the server-side principal. No Ray here.

Groups come only from the key store, never from the request; a request may narrow its
groups (``groups`` field) but never widen them.

What an unauthenticated caller can cost the server is bounded, since the store that
answers key lookups also answers every epoch read and revocation acknowledgement:

- a malformed key (not ``as_<16 hex>_<64 hex>``) is refused here, without a store call;
- a valid key is cached for ``serve.key_cache_ttl_s`` seconds, which bounds how long a
  revoked key keeps working;
- a well-formed key the store does not know (or revoked) is cached negatively for
  ``serve.negative_key_cache_ttl_s`` seconds (1 s by default), in an LRU of at most
  ``serve.negative_key_cache_size`` entries, so repeating a bad key costs one store call per
  TTL and a flood of distinct keys cannot grow memory;
- given ``key_ids`` (the store's unrevoked key ids, which are public), a key whose id is
  not among them is refused without a lookup. The list is read again when an unknown id
  comes and it is older than the negative TTL, so a flood of random well-formed keys costs
  at most one store call per TTL, not one per key;
- store calls from the async path run on a small executor of their own
  (``LOOKUP_THREADS``), so a flood of unknown keys neither queues more than that many calls
  at the store nor takes the threads that routing and deletes use.

Why the negative TTL is short: a key is only ever refused from these caches if it was
presented, or an unknown id came, less than a TTL before the key was created (or restored).
It then works within that TTL; otherwise at once.

The caches are keyed by a SHA-256 of the key, so no plaintext key sits in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from adapterswap.errors import Forbidden, InvalidArgument, Unauthorized
from adapterswap.store.keys import split_key
from adapterswap.types import Principal

BEARER = "bearer "
# Concurrent store lookups of one authenticator on the async path.
LOOKUP_THREADS = 2


class Authenticator:
    """Resolves ``Authorization`` headers to principals, with short-lived caches."""

    def __init__(
        self,
        lookup: Callable[[str], Principal | None],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        negative_ttl_s: float = 1.0,
        negative_cache_size: int = 10_000,
        key_ids: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        """``lookup`` and ``key_ids`` read the store (see the module docstring)."""
        self._lookup = lookup
        self._ttl = ttl_s
        self._negative_ttl = negative_ttl_s
        self._negative_size = negative_cache_size
        self._key_ids = key_ids if negative_ttl_s > 0 else None
        self._clock = clock
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        self._refused: OrderedDict[bytes, float] = OrderedDict()  # digest -> expiry, LRU
        self._ids: frozenset[str] | None = None  # the store's key ids, read at _ids_read
        self._ids_read = 0.0
        self._lock = threading.Lock()
        self._reading_ids = threading.Lock()  # one read of the id list at a time
        self._executor: ThreadPoolExecutor | None = None
        self.store_lookups = 0  # store calls made, for metrics and tests
        self.id_list_reads = 0

    @property
    def refused_cached(self) -> int:
        """Unknown keys remembered now (at most ``negative_cache_size``)."""
        with self._lock:
            return len(self._refused)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a ``Bearer <key>`` header; Unauthorized otherwise. Blocks on a
        cache miss (a store read): call it off the event loop, or use :meth:`authenticate_async`."""
        key_id, key, digest = _parse(authorization)
        cached = self._cached(key_id, digest)
        return cached if cached is not None else self._look_up(key_id, key, digest)

    async def authenticate_async(self, authorization: str | None) -> Principal:
        """:meth:`authenticate` for the event loop: header and cache checks answer inline;
        a miss waits for one of ``LOOKUP_THREADS`` store calls."""
        key_id, key, digest = _parse(authorization)
        cached = self._cached(key_id, digest)
        if cached is not None:
            return cached
        if self._executor is None:
            self._executor = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="key-lookup")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._look_up, key_id, key, digest)

    def _cached(self, key_id: str, digest: bytes) -> Principal | None:
        """A cached principal; Unauthorized for a cached refusal; None on a miss."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
            refused = self._refused.get(digest)
            unknown_id = self._id_unknown(key_id, now)
        if hit is not None and hit[1] > now:
            return hit[0]
        if (refused is not None and refused > now) or unknown_id:
            raise Unauthorized("invalid or revoked API key")
        return None

    def _id_unknown(self, key_id: str, now: float) -> bool:
        """Whether the id list, fresh enough, lacks ``key_id`` (call under ``_lock``)."""
        ids = self._ids
        if self._key_ids is None or ids is None or key_id in ids:
            return False
        return now < self._ids_read + self._negative_ttl

    def _read_ids(self, asked: float) -> None:
        """Read the id list again, unless another thread did since ``asked``."""
        with self._reading_ids:
            with self._lock:
                if self._ids is not None and self._ids_read >= asked:
                    return
                self.id_list_reads += 1
            ids = frozenset(self._key_ids())  # type: ignore[misc]
            with self._lock:
                self._ids, self._ids_read = ids, self._clock()

    def _look_up(self, key_id: str, key: str, digest: bytes) -> Principal:
        now = self._clock()
        if self._key_ids is not None:
            with self._lock:
                stale = self._ids is None or key_id not in self._ids
            if stale:
                self._read_ids(now)
            with self._lock:
                unknown = key_id not in (self._ids or ())
            if unknown:
                self._refuse(digest, now)
                raise Unauthorized("invalid or revoked API key")
        with self._lock:
            self.store_lookups += 1
        principal = self._lookup(key)  # a store error propagates and caches nothing
        if principal is None:
            self._refuse(digest, now)
            raise Unauthorized("invalid or revoked API key")
        with self._lock:
            self._refused.pop(digest, None)
            self._cache[digest] = (principal, now + self._ttl)
        return principal

    def _refuse(self, digest: bytes, now: float) -> None:
        with self._lock:
            self._cache.pop(digest, None)
            if self._negative_ttl > 0 and self._negative_size > 0:
                self._refused[digest] = now + self._negative_ttl
                self._refused.move_to_end(digest)
                while len(self._refused) > self._negative_size:
                    self._refused.popitem(last=False)


def _parse(authorization: str | None) -> tuple[str, str, bytes]:
    """Key id, key and digest of a well-formed ``Bearer`` header; Unauthorized otherwise."""
    if not authorization or not authorization.lower().startswith(BEARER):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = authorization[len(BEARER) :].strip()
    parts = split_key(key)
    if parts is None:
        raise Unauthorized("malformed API key: a key reads as_<16 hex digits>_<64 hex digits>")
    return parts[0], key, hashlib.sha256(key.encode()).digest()


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden(
            f"user {principal.user!r} is not an admin; this endpoint needs an admin key"
        )


def effective_groups(principal: Principal, requested: Iterable[str] | None) -> tuple[str, ...]:
    """The groups a request may use: the key's, narrowed by ``requested``, never widened.

    Naming a group the key does not hold is a 400 that names only that group: the message
    says nothing the caller does not already know (its own groups), not whether it exists.
    """
    held = tuple(sorted(principal.groups))
    if requested is None:
        return held
    extra = sorted(set(requested) - set(held))
    if extra:
        raise InvalidArgument(
            f"groups: {extra[0]!r} is not one of your groups; it can only narrow them"
        )
    return tuple(g for g in held if g in set(requested))
