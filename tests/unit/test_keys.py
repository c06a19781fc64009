"""API key format, salted hashing, constant-time verification and principal validation."""

from __future__ import annotations

import pytest

from adapterswap.errors import InvalidArgument
from adapterswap.store import keys


def test_generated_key_splits_back_into_its_id_and_secret() -> None:
    key_id, secret, plaintext = keys.generate_key()
    assert plaintext == f"as_{key_id}_{secret}"
    assert keys.split_key(plaintext) == (key_id, secret)
    assert len(key_id) == 16 and len(secret) == 64


def test_generated_keys_differ() -> None:
    assert len({keys.generate_key()[2] for _ in range(50)}) == 50


@pytest.mark.parametrize(
    "key",
    [
        "",
        "as_",
        "as_0123456789abcdef",
        "as_0123456789abcdef_" + "a" * 63,
        "as_0123456789abcdef_" + "a" * 65,
        "xx_0123456789abcdef_" + "a" * 64,
        "as_0123456789ABCDEF_" + "a" * 64,
        " as_0123456789abcdef_" + "a" * 64,
        "Bearer as_0123456789abcdef_" + "a" * 64,
        # The ingress refuses whatever this rejects without asking the store, so it must
        # reject every lookalike: a trailing newline, Unicode digits, a lone surrogate.
        "as_0123456789abcdef_" + "a" * 64 + "\n",
        "as_٠١٢٣٤٥٦٧٨٩abcdef_" + "a" * 64,
        "as_0123456789abcdef_" + "a" * 63 + "\ud800",
        "as_" + "0" * 10_000,
        None,
        12,
    ],
)
def test_split_key_rejects_malformed_keys(key: object) -> None:
    assert keys.split_key(key) is None  # type: ignore[arg-type]


def test_hash_verifies_the_right_secret_only() -> None:
    salt = keys.new_salt()
    stored = keys.hash_secret("a" * 64, salt)
    assert keys.verify_secret("a" * 64, salt, stored)
    assert not keys.verify_secret("b" * 64, salt, stored)
    assert not keys.verify_secret("a" * 64, keys.new_salt(), stored)


def test_the_salt_changes_the_hash() -> None:
    salt1, salt2 = keys.new_salt(), keys.new_salt()
    assert salt1 != salt2
    assert keys.hash_secret("a" * 64, salt1) != keys.hash_secret("a" * 64, salt2)


def test_user_is_stripped_and_must_not_be_empty() -> None:
    assert keys.validate_user("  alice ") == "alice"
    with pytest.raises(InvalidArgument, match="user: got '  '; give a non-empty user name"):
        keys.validate_user("  ")
    with pytest.raises(InvalidArgument, match="printable"):
        keys.validate_user("al\nice")


def test_groups_are_sorted_and_deduplicated() -> None:
    assert keys.validate_groups(["hr", "eng", "hr"]) == ("eng", "hr")


@pytest.mark.parametrize("bad", ["HR", "", "-hr", "h r", "x" * 65, "hr/eng"])
def test_bad_group_names_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=f"group: got '{bad}'; a group name must match"):
        keys.validate_groups(["ok", bad])


def test_at_least_one_group_is_needed() -> None:
    with pytest.raises(InvalidArgument, match="groups: got none; a key needs at least one group"):
        keys.validate_groups([])


def test_a_bare_string_is_not_a_list_of_groups() -> None:
    with pytest.raises(InvalidArgument, match="groups: got the string 'hr'"):
        keys.validate_groups("hr")
