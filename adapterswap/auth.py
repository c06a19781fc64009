"""Authentication: from a bearer key to the server-side principal. No Ray here.

Groups come only from the key store, never from the request; a request may narrow its
groups (``groups`` field) but never widen them. Lookups are cached for at most
``serve.key_cache_ttl_s`` seconds, which bounds how long a revoked key keeps working.
Only positive results are cached, so a key created a moment ago works at once. The cache
is keyed by a SHA-256 of the key, so no plaintext key sits in the replica's memory map.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable

from adapterswap.errors import Forbidden, InvalidArgument, Unauthorized
from adapterswap.keys import Principal

BEARER = "bearer "


class Authenticator:
    """Resolves ``Authorization`` headers to principals, with a short-lived cache."""

    def __init__(
        self,
        lookup: Callable[[str], Principal | None],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a ``Bearer <key>`` header; Unauthorized otherwise."""
        if not authorization or not authorization.lower().startswith(BEARER):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        key = authorization[len(BEARER) :].strip()
        digest = hashlib.sha256(key.encode()).digest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = self._lookup(key)
        if principal is None:
            with self._lock:
                self._cache.pop(digest, None)
            raise Unauthorized("invalid or revoked API key")
        with self._lock:
            self._cache[digest] = (principal, now + self._ttl)
        return principal


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
