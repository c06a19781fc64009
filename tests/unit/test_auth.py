"""Authentication: bearer keys, the revocation bound of the cache, groups only narrowed."""

from __future__ import annotations

import pytest

from adapterswap.auth import Authenticator, effective_groups, require_admin
from adapterswap.errors import Forbidden, InvalidArgument, Unauthorized
from adapterswap.registry import AdapterRegistry


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


def test_new_keys_work_at_once_no_negative_cache(store):
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
