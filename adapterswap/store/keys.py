"""API keys: generation, salted hashing and constant-time verification.

A key reads ``as_<key_id>_<secret>``. The key id (16 hex digits) is public: it names the
stored row, shows up in ``keys list`` and in the audit log. The secret (64 hex digits,
256 random bits) is shown once, at creation, and only ``HMAC-SHA256(salt, secret)`` with a
per-key random salt is stored.

Why a plain salted HMAC and not a slow password hash (scrypt, argon2): slow hashes exist to
make guessing low-entropy, human-chosen passwords expensive. These secrets are 256 random
bits, so brute force is hopeless at any hash speed, and a fast hash keeps every
authenticated request cheap. The salt keeps equal secrets from producing equal rows.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

from adapterswap.config import GROUP_PATTERN
from adapterswap.errors import InvalidArgument

KEY_PREFIX = "as"
_KEY_RE = re.compile(rf"{KEY_PREFIX}_([0-9a-f]{{16}})_([0-9a-f]{{64}})")
_GROUP_RE = re.compile(GROUP_PATTERN)
_MAX_USER_CHARS = 256
SALT_BYTES = 16


def generate_key() -> tuple[str, str, str]:
    """Return ``(key_id, secret, plaintext_key)`` drawn from the OS's secure random source."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_hex(32)
    return key_id, secret, f"{KEY_PREFIX}_{key_id}_{secret}"


def split_key(key: str) -> tuple[str, str] | None:
    """Return ``(key_id, secret)`` of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    return (match.group(1), match.group(2)) if match else None


def new_salt() -> bytes:
    """A fresh random salt for one key."""
    return secrets.token_bytes(SALT_BYTES)


def hash_secret(secret: str, salt: bytes) -> bytes:
    """``HMAC-SHA256(salt, secret)``: the only form of a secret that is ever stored."""
    return hmac.new(salt, secret.encode("ascii"), hashlib.sha256).digest()


def verify_secret(secret: str, salt: bytes, expected: bytes) -> bool:
    """Whether ``secret`` hashes to ``expected``, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret, salt), expected)


def validate_user(user: str) -> str:
    """Return ``user`` stripped, or raise InvalidArgument naming what is wrong."""
    name = user.strip() if isinstance(user, str) else ""
    if not name:
        raise InvalidArgument(f"user: got {user!r}; give a non-empty user name")
    if len(name) > _MAX_USER_CHARS or not name.isprintable():
        raise InvalidArgument(
            f"user: got {user!r}; use at most {_MAX_USER_CHARS} printable characters"
        )
    return name


def validate_group(group: str) -> str:
    """Return ``group`` unchanged if it matches GROUP_PATTERN, else raise InvalidArgument."""
    if not isinstance(group, str) or not _GROUP_RE.fullmatch(group):
        raise InvalidArgument(
            f"group: got {group!r}; a group name must match {GROUP_PATTERN} "
            "(lower-case letters, digits, '_' and '-', starting with a letter or digit)"
        )
    return group


def validate_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """Return the groups sorted and de-duplicated; at least one, each a valid group name."""
    if isinstance(groups, str):
        raise InvalidArgument(f"groups: got the string {groups!r}; pass a list of group names")
    checked = tuple(sorted({validate_group(g) for g in groups}))
    if not checked:
        raise InvalidArgument("groups: got none; a key needs at least one group")
    return checked
