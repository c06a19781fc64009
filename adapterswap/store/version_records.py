"""Adapter versions and their lineage: register, activate, revoke, fail, purge, and read them.

Adapter version statuses and the only legal transitions::

    method      from               to        note
    ----------  -----------------  --------  ---------------------------------------------
    register    (new version)      training  versions count 1, 2, 3 ... per adapter
    activate    training           active    the adapter's active version, if any, becomes
                                             revoked in the same transaction (superseded)
    fail        training           failed    a training run died; its files get swept up
    revoke      active             revoked   stop serving it (delete, supersede, operator)
    purge       revoked, failed    purged    call once the version's files are deleted

Everything else raises IllegalTransition: a revoked, failed or purged version never comes
back (register a new version instead); a training version is stopped with ``fail``, not
``revoke``; an active version must be revoked before it is purged. A trigger in the
database refuses any other change of status too, whoever writes it.

A version's lineage is the documents it was trained on, each with the content hash it saw
when the trainer says (NULL otherwise, which matches every content of that id). A version
whose lineage holds a document with an unfinished deletion cannot be activated (see
:mod:`adapterswap.store.deletion_records`). Activating and revoking bump the epoch. Mixed
into :class:`~adapterswap.store.registry.AdapterRegistry`, which provides the connection,
the transactions, the epoch and the audit log.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from adapterswap.errors import IllegalTransition, InvalidArgument, NotFound
from adapterswap.store import keys
from adapterswap.store.core import Transactions, bump_epoch, read_meta, write_audit
from adapterswap.store.records import timestamp, version_from_row
from adapterswap.types import ActiveChanges, AdapterRef, AdapterStatus, AdapterVersion

# target status -> the statuses a version may move to it from (see the module docstring).
_ALLOWED_FROM: dict[AdapterStatus, tuple[AdapterStatus, ...]] = {
    AdapterStatus.ACTIVE: (AdapterStatus.TRAINING,),
    AdapterStatus.FAILED: (AdapterStatus.TRAINING,),
    AdapterStatus.REVOKED: (AdapterStatus.ACTIVE,),
    AdapterStatus.PURGED: (AdapterStatus.REVOKED, AdapterStatus.FAILED),
}
_HINTS: dict[tuple[AdapterStatus, AdapterStatus], str] = {
    (AdapterStatus.TRAINING, AdapterStatus.REVOKED): "; stop a training version with fail",
    (AdapterStatus.ACTIVE, AdapterStatus.PURGED): "; revoke it first",
}
_FINAL_HINT = "; register a new version instead"


_VERSION_SELECT = """
SELECT v.adapter_id, v.version, a.grp, v.status, v.uri, v.doc_count, v.created_at, v.updated_at
FROM versions v JOIN adapters a ON a.adapter_id = v.adapter_id
"""
_VERSION_ORDER = " ORDER BY v.adapter_id, v.version"
# A delta since an epoch (migration 3's stamps). >=: a writer that moves a status before
# bumping the epoch stamps the epoch before its own. INDEXED BY: left to itself SQLite walks
# the primary key (to skip the sort) or the status index, every version or every active one,
# where the epoch indexes read only the changed ones.
ADDED_SINCE = _VERSION_SELECT.replace("versions v", "versions v INDEXED BY versions_by_activated")
ADDED_SINCE += " WHERE v.activated_epoch >= ? AND v.status = 'active'" + _VERSION_ORDER
REMOVED_SINCE = (
    "SELECT adapter_id, version FROM versions INDEXED BY versions_by_deactivated "
    "WHERE deactivated_epoch >= ? ORDER BY adapter_id, version"
)


def _illegal(current: AdapterStatus, target: AdapterStatus, ref: AdapterRef) -> IllegalTransition:
    allowed = _ALLOWED_FROM[target]
    if current in (AdapterStatus.REVOKED, AdapterStatus.FAILED, AdapterStatus.PURGED):
        hint = _HINTS.get((current, target), _FINAL_HINT)
    else:
        hint = _HINTS.get((current, target), "")
    return IllegalTransition(
        f"cannot make adapter {ref.id!r} version {ref.version} {target}: it is {current}, and "
        f"only a {' or '.join(allowed)} version can become {target}{hint}"
    )


def read_version(conn: sqlite3.Connection, adapter_id: str, version: int) -> AdapterVersion:
    """One version, in the caller's transaction; NotFound if it does not exist."""
    row = conn.execute(
        _VERSION_SELECT + " WHERE v.adapter_id = ? AND v.version = ?", (adapter_id, version)
    ).fetchone()
    if row is None:
        raise NotFound(f"adapter {adapter_id!r} version {version} does not exist")
    return version_from_row(row)


def move_version(
    conn: sqlite3.Connection, adapter_id: str, version: int, target: AdapterStatus
) -> AdapterVersion:
    """Check the transition table and set the new status; the caller writes the audit row."""
    current = read_version(conn, adapter_id, version)
    if current.status not in _ALLOWED_FROM[target]:
        raise _illegal(current.status, target, current.ref)
    conn.execute(
        "UPDATE versions SET status = ?, updated_at = ? WHERE adapter_id = ? AND version = ?",
        (target.value, timestamp(), adapter_id, version),
    )
    return read_version(conn, adapter_id, version)


def read_versions_containing(
    conn: sqlite3.Connection, doc_id: str, content_hash: str | None = None
) -> list[AdapterVersion]:
    """``versions_containing`` in the caller's transaction."""
    sql = _VERSION_SELECT + (
        " JOIN lineage l ON l.adapter_id = v.adapter_id AND l.version = v.version"
        " WHERE l.doc_id = ?1 AND (?2 IS NULL OR l.content_hash IS NULL"
        " OR l.content_hash = ?2)"
    )
    rows = conn.execute(sql + _VERSION_ORDER, (doc_id, content_hash))
    return [version_from_row(r) for r in rows]


def _status(value: str) -> AdapterStatus:
    try:
        return AdapterStatus(value)
    except ValueError:
        known = ", ".join(s.value for s in AdapterStatus)
        raise InvalidArgument(f"statuses: got {value!r}; use some of {known}") from None


class VersionRecords:
    """Move adapter versions through their statuses and read them (each call is one
    transaction)."""

    # -- adapter versions: mutations -----------------------------------------------------

    def register_version(
        self: Transactions,
        adapter_id: str,
        group: str,
        uri: str,
        doc_ids: Iterable[str],
        *,
        manifest: dict[str, Any] | None = None,
        actor: str = "system",
        content_hashes: Mapping[str, str] | None = None,
    ) -> AdapterVersion:
        """Record a new version (the next integer) of shard ``adapter_id``, status training.

        ``doc_ids`` are exactly the documents this version trains on (its lineage), and
        ``content_hashes`` the content of each it saw, where known. A lineage document without
        one matches every deletion of its id (see ``activate``). An adapter never changes
        group: a shard never mixes groups.
        """
        if not adapter_id:
            raise InvalidArgument("adapter_id: got an empty string; give the shard id")
        keys.validate_group(group)
        docs = sorted(set(doc_ids))
        now = timestamp()
        with self._write() as conn:
            row = conn.execute(
                "SELECT grp FROM adapters WHERE adapter_id = ?", (adapter_id,)
            ).fetchone()
            if row is None:
                conn.execute("INSERT INTO adapters VALUES (?, ?, ?)", (adapter_id, group, now))
            elif row["grp"] != group:
                raise InvalidArgument(
                    f"group: adapter {adapter_id!r} belongs to group {row['grp']!r}, got "
                    f"{group!r}; a shard never changes group"
                )
            version = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE adapter_id = ?",
                (adapter_id,),
            ).fetchone()[0]
            manifest_json = None if manifest is None else json.dumps(manifest, sort_keys=True)
            values = (adapter_id, version, "training", uri, len(docs), manifest_json, now, now)
            conn.execute(
                "INSERT INTO versions (adapter_id, version, status, uri, doc_count, manifest, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            hashes = content_hashes or {}
            conn.executemany(
                "INSERT INTO lineage (adapter_id, version, doc_id, content_hash) VALUES (?, ?, ?, ?)",
                ((adapter_id, version, d, hashes.get(d)) for d in docs),
            )
            details = {"id": adapter_id, "version": version, "group": group, "uri": uri}
            write_audit(conn, actor, "register", details | {"doc_count": len(docs)})
            return read_version(conn, adapter_id, version)

    def activate(
        self: Transactions,
        adapter_id: str,
        version: int,
        *,
        manifest: dict[str, Any] | None = None,
        actor: str = "system",
    ) -> AdapterVersion:
        """Make a training version active, revoking (superseding) the adapter's active one.

        ``manifest``, when given, replaces the one recorded at registration (the final one,
        with the run's metrics), in the same transaction.
        """
        with self._write() as conn:
            current = read_version(conn, adapter_id, version)
            if current.status != AdapterStatus.TRAINING:  # checked before touching the old one
                raise _illegal(current.status, AdapterStatus.ACTIVE, current.ref)
            deleting = conn.execute(
                "SELECT l.doc_id, d.state, d.job_id FROM lineage l JOIN deletions d "
                "ON d.doc_id = l.doc_id WHERE l.adapter_id = ? AND l.version = ? "
                "AND d.state != 'purged' AND (d.content_hash IS NULL OR l.content_hash IS NULL "
                "OR d.content_hash = l.content_hash) ORDER BY d.deletion_id LIMIT 1",
                (adapter_id, version),
            ).fetchone()
            if deleting is not None:
                raise IllegalTransition(
                    f"{adapter_id} v{version} cannot be activated: its lineage holds document "
                    f"{deleting[0]!r}, whose deletion is unfinished ({deleting[1]}, job "
                    f"{deleting[2]}); train the shard again once that deletion is done"
                )
            if manifest is not None:
                conn.execute(
                    "UPDATE versions SET manifest = ? WHERE adapter_id = ? AND version = ?",
                    (json.dumps(manifest, sort_keys=True), adapter_id, version),
                )
            old = conn.execute(
                "SELECT version FROM versions WHERE adapter_id = ? AND status = 'active'",
                (adapter_id,),
            ).fetchone()
            if old is not None:
                move_version(conn, adapter_id, old[0], AdapterStatus.REVOKED)
            activated = move_version(conn, adapter_id, version, AdapterStatus.ACTIVE)
            epoch = bump_epoch(conn)  # one change of the active set: +1, supersede or not
            if old is not None:
                details = {"id": adapter_id, "version": old[0], "epoch": epoch}
                details |= {"reason": "superseded", "superseded_by": version}
                write_audit(conn, actor, "revoke", details)
            details = {"id": adapter_id, "version": version, "epoch": epoch}
            write_audit(conn, actor, "activate", details)
            return activated

    def revoke(
        self: Transactions,
        adapter_id: str,
        version: int,
        *,
        reason: str = "",
        actor: str = "system",
    ) -> AdapterVersion:
        """Stop serving an active version; bumps the epoch."""
        with self._write() as conn:
            revoked = move_version(conn, adapter_id, version, AdapterStatus.REVOKED)
            epoch = bump_epoch(conn)
            details = {"id": adapter_id, "version": version, "epoch": epoch, "reason": reason}
            write_audit(conn, actor, "revoke", details)
            return revoked

    def fail(
        self: Transactions,
        adapter_id: str,
        version: int,
        *,
        reason: str = "",
        actor: str = "system",
    ) -> AdapterVersion:
        """Mark a training version failed (its run died or was cancelled)."""
        with self._write() as conn:
            failed = move_version(conn, adapter_id, version, AdapterStatus.FAILED)
            write_audit(
                conn, actor, "fail", {"id": adapter_id, "version": version, "reason": reason}
            )
            return failed

    def purge(
        self: Transactions, adapter_id: str, version: int, *, actor: str = "system"
    ) -> AdapterVersion:
        """Mark a revoked or failed version purged, once its files are deleted."""
        with self._write() as conn:
            purged = move_version(conn, adapter_id, version, AdapterStatus.PURGED)
            write_audit(conn, actor, "purge", {"id": adapter_id, "version": version})
            return purged

    # -- adapter versions: queries -------------------------------------------------------

    def get_version(self: Transactions, adapter_id: str, version: int) -> AdapterVersion:
        """One version; NotFound if it does not exist."""
        with self._lock:
            return read_version(self._conn, adapter_id, version)

    def list_versions(
        self: Transactions,
        adapter_id: str | None = None,
        statuses: Iterable[str] | None = None,
        *,
        groups: Iterable[str] | None = None,
        after: tuple[str, int] | None = None,
        limit: int | None = None,
    ) -> list[AdapterVersion]:
        """Versions sorted by (id, version), optionally of one adapter, some statuses and/or
        some groups; a page of them with ``after`` (the last (id, version) of the previous
        page: keyset pagination, which walks the primary key from there) and ``limit``."""
        where, params = ["1"], []
        for column, values in (
            ("v.status", None if statuses is None else [_status(s).value for s in statuses]),
            ("a.grp", None if groups is None else list(groups)),
        ):
            if values is not None:
                where.append(f"{column} IN (SELECT value FROM json_each(?))")
                params.append(json.dumps(values))
        if adapter_id is not None:
            where.append("v.adapter_id = ?")
            params.append(adapter_id)
        if after is not None:
            where.append("(v.adapter_id, v.version) > (?, ?)")
            params += [after[0], after[1]]
        sql = _VERSION_SELECT + " WHERE " + " AND ".join(where) + _VERSION_ORDER + " LIMIT ?"
        params.append(-1 if limit is None else limit)
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [version_from_row(r) for r in rows]

    def active_adapters(self: Transactions, groups: Iterable[str]) -> list[AdapterVersion]:
        """The active version of every adapter whose group is in ``groups``, sorted by id."""
        sql = _VERSION_SELECT + (
            " WHERE v.status = 'active' AND a.grp IN (SELECT value FROM json_each(?))"
        )
        with self._lock:
            rows = self._conn.execute(sql + _VERSION_ORDER, (json.dumps(list(groups)),))
            return [version_from_row(r) for r in rows.fetchall()]

    def active_snapshot(self: Transactions) -> tuple[int, list[AdapterVersion]]:
        """The epoch and every active version, read in one snapshot (what a replica syncs to)."""
        sql = _VERSION_SELECT + " WHERE v.status = 'active'" + _VERSION_ORDER
        with self._read() as conn:
            epoch = int(read_meta(conn, "epoch"))
            rows = conn.execute(sql).fetchall()
        return epoch, [version_from_row(r) for r in rows]

    def active_changes(self: Transactions, since_epoch: int) -> ActiveChanges | None:
        """What changed in the active set after ``since_epoch``, in one snapshot; None when
        the store cannot say (``since_epoch`` is from before migration 3's ``delta_floor``,
        or ahead of the store's epoch: another store, or one restored from a backup), so the
        caller reads ``active_snapshot`` instead. Both reads walk an index of the epochs
        (migration 3): the cost is the changes', not the active set's."""
        with self._read() as conn:
            epoch = int(read_meta(conn, "epoch"))
            if not int(read_meta(conn, "delta_floor")) <= since_epoch <= epoch:
                return None
            added = conn.execute(ADDED_SINCE, (since_epoch,)).fetchall()
            removed = conn.execute(REMOVED_SINCE, (since_epoch,)).fetchall()
        return ActiveChanges(
            since_epoch,
            epoch,
            tuple(version_from_row(r) for r in added),
            tuple(AdapterRef(r[0], r[1]) for r in removed),
        )

    def versions_containing(
        self: Transactions, doc_id: str, content_hash: str | None = None
    ) -> list[AdapterVersion]:
        """Every version (any status) whose lineage includes ``doc_id``; with ``content_hash``,
        only those that saw that content (or whose lineage does not say which content)."""
        with self._read() as conn:
            return read_versions_containing(conn, doc_id, content_hash)

    def lineage(self, adapter_id: str, version: int) -> list[str]:
        """The sorted doc ids a version was trained on."""
        return sorted(self.lineage_hashes(adapter_id, version))

    def lineage_hashes(self: Transactions, adapter_id: str, version: int) -> dict[str, str | None]:
        """Doc id -> the content hash the version saw (None: not recorded)."""
        with self._read() as conn:
            read_version(conn, adapter_id, version)
            rows = conn.execute(
                "SELECT doc_id, content_hash FROM lineage WHERE adapter_id = ? AND version = ? "
                "ORDER BY doc_id",
                (adapter_id, version),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def manifest(self: Transactions, adapter_id: str, version: int) -> dict[str, Any] | None:
        """The manifest given at registration, or None."""
        with self._read() as conn:
            read_version(conn, adapter_id, version)
            raw = conn.execute(
                "SELECT manifest FROM versions WHERE adapter_id = ? AND version = ?",
                (adapter_id, version),
            ).fetchone()[0]
        return None if raw is None else json.loads(raw)
