"""API keys as rows of the store: create, list, revoke, and look a key up to its principal.

Only the salted hash of a key's secret is stored (see :mod:`adapterswap.store.keys` for the
key format and the hashing). Mixed into :class:`~adapterswap.store.registry.AdapterRegistry`,
which provides the connection and the transactions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from adapterswap.errors import NotFound
from adapterswap.store import keys
from adapterswap.store.core import Transactions, write_audit
from adapterswap.store.records import KeyRecord, key_from_row, timestamp
from adapterswap.types import Principal

_KEY_COLUMNS = "key_id, user, groups, admin, created_at, revoked_at"
# lookup_key hashes against these for an unknown key id, so it costs what a known one does.
_DUMMY_SALT = keys.new_salt()
_DUMMY_HASH = keys.hash_secret("0" * 64, _DUMMY_SALT)


class KeyRecords:
    """Create, list, revoke and look up API keys (each call is one transaction)."""

    def create_key(
        self: Transactions,
        user: str,
        groups: Iterable[str],
        *,
        admin: bool = False,
        actor: str = "system",
    ) -> tuple[str, KeyRecord]:
        """Create a key; return its plaintext (shown once, never stored) and its record."""
        user = keys.validate_user(user)
        checked = keys.validate_groups(groups)
        key_id, secret, plaintext = keys.generate_key()
        salt = keys.new_salt()
        with self._write() as conn:
            hashed = keys.hash_secret(secret, salt)
            values = (key_id, salt, hashed, user, json.dumps(checked), int(admin), timestamp())
            conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, NULL)", values)
            details = {"key_id": key_id, "user": user, "groups": list(checked), "admin": admin}
            write_audit(conn, actor, "create_key", details)
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return plaintext, key_from_row(row)

    def list_keys(self: Transactions) -> list[KeyRecord]:
        """Every key, revoked ones included, by creation time. No hashes, no secrets."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
        return [key_from_row(r) for r in rows]

    def revoke_key(self: Transactions, key_id: str, *, actor: str = "system") -> KeyRecord:
        """Revoke a key. Revoking a revoked key changes nothing and returns its record."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (timestamp(), key_id),
            ).rowcount
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"key_id: no key {key_id!r}; `adapterswap keys list` shows them")
            if changed:
                write_audit(conn, actor, "revoke_key", {"key_id": key_id})
        return key_from_row(row)

    def lookup_key(self: Transactions, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for unknown, malformed or revoked."""
        parts = keys.split_key(key)
        if parts is None:
            return None
        key_id, secret = parts
        with self._lock:
            row = self._conn.execute(
                "SELECT salt, hash, user, groups, admin, revoked_at FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        salt, expected = (row["salt"], row["hash"]) if row else (_DUMMY_SALT, _DUMMY_HASH)
        if not keys.verify_secret(secret, salt, expected) or row is None or row["revoked_at"]:
            return None
        groups = tuple(json.loads(row["groups"]))
        return Principal(key_id=key_id, user=row["user"], groups=groups, admin=bool(row["admin"]))
