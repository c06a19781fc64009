"""Authentication: bearer keys, the revocation bound of the cache, groups only narrowed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from adapterswap.api.auth import Authenticator, effective_groups, require_admin
from adapterswap.errors import Forbidden, InvalidArgument, StoreUnavailable, Unauthorized
from adapterswap.store.registry import AdapterRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    return AdapterRegistry(tmp_path / "s.sqlite")


def test_valid_key_gives_the_stored_principal(store):
    key, record = store.create_key("ann", ["hr", "finance"])
    auth = Authenticator(store.lookup_key, ttl_s=5)
    principal = auth.authenticate(f"Bearer {key}")
    assert (
        principal.user == "ann"
        and set(principal.groups) == {"hr", "finance"}
        and not principal.admin
    )
    assert auth.authenticate(f"bearer {key}") == principal


@pytest.mark.parametrize(
    "header", [None, "", "Basic abc", "Bearer ", "Bearer as_0000_1111", "Bearer nonsense"]
)
def test_missing_or_bad_keys_are_401(store, header):
    with pytest.raises(Unauthorized):
        Authenticator(store.lookup_key, ttl_s=5).authenticate(header)


def test_revocation_takes_effect_within_the_ttl(store):
    key, record = store.create_key("bob", ["hr"])
    clock = Clock()
    auth = Authenticator(store.lookup_key, ttl_s=5, clock=clock)
    auth.authenticate(f"Bearer {key}")
    store.revoke_key(record.key_id)
    clock.now = 4.9
    auth.authenticate(f"Bearer {key}")  # still cached: within the documented bound
    clock.now = 5.1
    with pytest.raises(Unauthorized, match="invalid or revoked"):
        auth.authenticate(f"Bearer {key}")


def test_new_keys_work_at_once(store):
    auth = Authenticator(store.lookup_key, ttl_s=60)
    with pytest.raises(Unauthorized):
        auth.authenticate("Bearer as_0123456789abcdef_" + "0" * 64)
    key, _ = store.create_key("cy", ["ops"])
    assert auth.authenticate(f"Bearer {key}").user == "cy"


def test_groups_only_narrow(store):
    key, _ = store.create_key("dee", ["hr", "finance"])
    principal = store.lookup_key(key)
    assert effective_groups(principal, None) == ("finance", "hr")
    assert effective_groups(principal, ["hr"]) == ("hr",)
    assert effective_groups(principal, []) == ()
    with pytest.raises(InvalidArgument, match="groups: 'legal' is not one of your groups"):
        effective_groups(principal, ["hr", "legal"])


def test_admin_required(store):
    key, _ = store.create_key("eve", ["hr"])
    with pytest.raises(Forbidden, match="not an admin"):
        require_admin(store.lookup_key(key))
    admin_key, _ = store.create_key("root", ["hr"], admin=True)
    require_admin(store.lookup_key(admin_key))


class CountingLookup:
    """The store's lookup, counted."""

    def __init__(self, store) -> None:
        self.store, self.calls = store, 0

    def __call__(self, key):
        self.calls += 1
        return self.store.lookup_key(key)


WELL_FORMED_UNKNOWN = "as_0123456789abcdef_" + "a" * 64


@pytest.mark.parametrize(
    "key",
    [
        "nonsense",
        "as_0000_1111",
        "as_0123456789ABCDEF_" + "a" * 64,  # upper-case hex is not a key
        "as_0123456789abcdef_" + "a" * 63,
        "as_0123456789abcdef_" + "a" * 64 + "0",
        "as_٠١٢٣٤٥٦٧٨٩abcdef_" + "a" * 64,  # Unicode digits are not hex digits
        "x" * 100_000,
    ],
)
def test_a_malformed_key_never_reaches_the_store(store, key):
    lookup = CountingLookup(store)
    with pytest.raises(Unauthorized, match="malformed API key"):
        Authenticator(lookup, ttl_s=5).authenticate(f"Bearer {key}")
    assert lookup.calls == 0


def test_an_unknown_key_is_refused_from_the_cache_for_the_negative_ttl_only(store):
    lookup, clock = CountingLookup(store), Clock()
    auth = Authenticator(lookup, ttl_s=60, clock=clock, negative_ttl_s=1.0)
    for _ in range(5):
        with pytest.raises(Unauthorized, match="invalid or revoked"):
            auth.authenticate(f"Bearer {WELL_FORMED_UNKNOWN}")
    assert lookup.calls == 1
    clock.now = 1.01  # past the negative TTL: the store is asked again
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer {WELL_FORMED_UNKNOWN}")
    assert lookup.calls == 2


def test_a_revoked_key_is_cached_negatively_and_a_new_key_works_at_once(store):
    key, record = store.create_key("fay", ["hr"])
    clock = Clock()
    auth = Authenticator(store.lookup_key, ttl_s=0, clock=clock, negative_ttl_s=1.0)
    auth.authenticate(f"Bearer {key}")
    store.revoke_key(record.key_id)
    clock.now = 0.1
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer {key}")
    fresh, _ = store.create_key("fay", ["hr"])  # never presented before: not in the cache
    assert auth.authenticate(f"Bearer {fresh}").user == "fay"


def test_the_negative_cache_is_bounded(store):
    lookup = CountingLookup(store)
    auth = Authenticator(lookup, ttl_s=5, negative_ttl_s=60, negative_cache_size=8)
    keys = [f"as_{i:016x}_{'b' * 64}" for i in range(100)]
    for key in keys:
        with pytest.raises(Unauthorized):
            auth.authenticate(f"Bearer {key}")
    assert auth.refused_cached == 8 and lookup.calls == 100
    with pytest.raises(Unauthorized):  # the most recent are the ones kept
        auth.authenticate(f"Bearer {keys[-1]}")
    assert lookup.calls == 100


def test_a_store_failure_caches_nothing(store):
    calls = []

    def failing(key):
        calls.append(key)
        raise StoreUnavailable("the adapter store did not answer in time")

    auth = Authenticator(failing, ttl_s=5)
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            auth.authenticate(f"Bearer {WELL_FORMED_UNKNOWN}")
    assert len(calls) == 2 and auth.refused_cached == 0


def test_the_async_path_answers_hits_inline_and_looks_up_misses_on_its_own_threads(store):
    key, _ = store.create_key("gus", ["ops"])
    threads = []

    def lookup(k):
        threads.append(threading.current_thread().name)
        return store.lookup_key(k)

    auth = Authenticator(lookup, ttl_s=5)

    async def run():
        first = await auth.authenticate_async(f"Bearer {key}")
        again = await auth.authenticate_async(f"Bearer {key}")
        with pytest.raises(Unauthorized, match="malformed"):
            await auth.authenticate_async("Bearer as_bad")
        return first, again

    first, again = asyncio.run(run())
    assert first == again and first.user == "gus"
    assert len(threads) == 1 and threads[0].startswith("key-lookup")


def active_ids(store):
    return lambda: [r.key_id for r in store.list_keys() if not r.revoked]


def test_random_well_formed_keys_cost_one_id_list_read_per_ttl_not_a_lookup_each(store):
    store.create_key("hal", ["hr"])
    lookup, clock = CountingLookup(store), Clock()
    auth = Authenticator(
        lookup, ttl_s=5, clock=clock, negative_ttl_s=1.0, key_ids=active_ids(store)
    )
    for i in range(500):  # a flood of distinct, well-formed, unknown keys
        with pytest.raises(Unauthorized):
            auth.authenticate(f"Bearer as_{i:016x}_{'c' * 64}")
    assert (lookup.calls, auth.id_list_reads) == (0, 1)
    clock.now = 1.5
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer as_{501:016x}_{'c' * 64}")
    assert (lookup.calls, auth.id_list_reads) == (0, 2)


def test_with_the_id_list_a_new_key_works_at_once_or_within_the_negative_ttl(store):
    clock = Clock()
    auth = Authenticator(
        store.lookup_key, ttl_s=5, clock=clock, negative_ttl_s=1.0, key_ids=active_ids(store)
    )
    first, _ = store.create_key("ivy", ["hr"])
    assert auth.authenticate(f"Bearer {first}").user == "ivy"  # the list is read: it is there
    clock.now = 10.0
    with pytest.raises(Unauthorized):  # an unknown id reads the list at t=10
        auth.authenticate(f"Bearer as_{'0' * 16}_{'d' * 64}")
    late, _ = store.create_key("jo", ["hr"])  # created just after that read
    clock.now = 10.5
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer {late}")
    clock.now = 11.01  # past the negative TTL: the list is read again
    assert auth.authenticate(f"Bearer {late}").user == "jo"


def test_a_known_id_with_a_wrong_secret_is_a_lookup_and_is_refused(store):
    key, record = store.create_key("kim", ["hr"])
    lookup = CountingLookup(store)
    auth = Authenticator(lookup, ttl_s=5, key_ids=active_ids(store))
    forged = f"as_{record.key_id}_{'0' * 64}"
    with pytest.raises(Unauthorized, match="invalid or revoked"):
        auth.authenticate(f"Bearer {forged}")
    assert lookup.calls == 1
    assert auth.authenticate(f"Bearer {key}").user == "kim"
