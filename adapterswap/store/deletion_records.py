"""Deletions: one row per deleted content of a document, and the one transaction that
revokes what was trained on it.

A deletion is a row keyed by (document id, content hash) that only moves forward (a
trigger refuses a step back), so a crashed delete is finished by running the delete job
again (``adapterswap.delete.job``). At most one deletion per key awaits its catalog removal
(``deleting``): only such a one covers a catalog row with its content, since a row with
that content seen after the removal is a newer one (a replacement by the very same text).
Finished ones stay as history, so an id may be deleted, re-ingested and deleted again::

    state      reached by
    ---------  -----------------------------------------------------------------------------
    deleting   begin_delete, one transaction: revoke EVERY active version whose lineage holds
               the id (whatever earlier deletions of it are unfinished), fail every training
               one, bump the epoch if anything was revoked, record a deletion for each content
               the catalog holds that no ``deleting`` one covers, create the job (or reuse
               the request's; a new job also takes over deletions whose job ended unfinished)
    removed    the row with that content is gone from the catalog (a replacement stays)
    retrained  the shards that held it were retrained without it (or retired, if now empty)
    purged     every version that saw it is purged: files gone, status purged. Done.

While any deletion of a document is unfinished (any state before ``purged``), no version
whose lineage holds that content (or holds the id without a content hash) can be activated
(``AdapterRegistry.activate`` checks). Mixed into
:class:`~adapterswap.store.registry.AdapterRegistry`, which provides the transactions, the
versions and the jobs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from adapterswap.errors import NotFound
from adapterswap.store.core import Transactions, bump_epoch, read_meta, write_audit
from adapterswap.store.job_records import insert_job, read_job
from adapterswap.store.records import (
    DeletionRecord,
    DeletionState,
    JobRecord,
    covers_row,
    deletion_from_row,
    timestamp,
)
from adapterswap.store.version_records import move_version, read_version, read_versions_containing
from adapterswap.types import AdapterRef, AdapterStatus, AdapterVersion

_DELETION_ORDER = list(DeletionState)


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else sorted(set(value))


def _insert_deletion(
    conn: sqlite3.Connection,
    doc_id: str,
    content_hash: str | None,
    job: JobRecord,
    actor: str,
    epoch: int,
    revoked: list[AdapterRef],
    shards: Mapping[str, Iterable[str]] | None,
    now: str,
) -> int:
    held = None if shards is None or doc_id not in shards else sorted(set(shards[doc_id]))
    cur = conn.execute(
        "INSERT INTO deletions (doc_id, content_hash, state, job_id, actor, epoch, revoked, "
        "shards, requested_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            doc_id,
            content_hash,
            DeletionState.DELETING.value,
            job.job_id,
            actor,
            epoch,
            json.dumps([[r.id, r.version] for r in revoked]),
            None if held is None else json.dumps(held),
            now,
            now,
        ),
    )
    return int(cur.lastrowid)


def _unfinished(conn: sqlite3.Connection, doc_id: str) -> list[DeletionRecord]:
    rows = conn.execute(
        "SELECT * FROM deletions WHERE doc_id = ? AND state != 'purged' ORDER BY deletion_id",
        (doc_id,),
    ).fetchall()
    return [deletion_from_row(r) for r in rows]


def _deletion_by_id(conn: sqlite3.Connection, deletion_id: int) -> DeletionRecord:
    row = conn.execute("SELECT * FROM deletions WHERE deletion_id = ?", (deletion_id,)).fetchone()
    if row is None:
        raise NotFound(f"no deletion {deletion_id}")
    return deletion_from_row(row)


def _revoke_holders(
    conn: sqlite3.Connection,
    holders: list[AdapterVersion],
    epoch: int,
    actor: str,
    reason: str,
) -> list[AdapterRef]:
    """Revoke the active versions among ``holders`` and fail the training ones."""
    revoked = []
    for version in holders:
        current = read_version(conn, version.adapter_id, version.version)
        details = {"id": version.adapter_id, "version": version.version, "reason": reason}
        if current.status == AdapterStatus.ACTIVE:
            move_version(conn, version.adapter_id, version.version, AdapterStatus.REVOKED)
            revoked.append(version.ref)
            write_audit(conn, actor, "revoke", details | {"epoch": epoch})
        elif current.status == AdapterStatus.TRAINING:
            move_version(conn, version.adapter_id, version.version, AdapterStatus.FAILED)
            write_audit(conn, actor, "fail", details)
    return revoked


class DeletionRecords:
    """Begin, advance and read deletions (each call is one transaction)."""

    def begin_delete(
        self: Transactions,
        doc_ids: Iterable[str],
        runner: str,
        *,
        actor: str = "system",
        content_hashes: Mapping[str, str | Iterable[str]] | None = None,
        shards: Mapping[str, Iterable[str]] | None = None,
        job_id: str | None = None,
    ) -> tuple[JobRecord | None, list[DeletionRecord]]:
        """Delete documents, in ONE transaction: revoke, fail, record, epoch, job.

        For every id, EVERY active version whose lineage holds it is revoked and every
        training one failed, whatever earlier deletions of the id are still unfinished, and
        the epoch moves once if anything was revoked. ``content_hashes`` gives the contents
        the catalog holds for an id (``shards`` where they are): each one no ``deleting``
        record covers (see ``covers_row``) gets a new one; an id given no content gets one
        for "any content" (None) unless it already has unfinished deletions. A deletion job is
        created (or ``job_id``, a pending one of the same request, reused) when anything
        changed, or when an unfinished deletion's job has ended (it was interrupted): the new
        job carries it on. Returns (that job, or None when the running job carries
        everything; the records covering the request, by id).
        """
        docs = sorted(set(doc_ids))
        given = {d: _as_list((content_hashes or {}).get(d)) for d in docs}
        with self._write() as conn:
            now, todo = timestamp(), []
            for doc_id in docs:
                unfinished = _unfinished(conn, doc_id)
                hashes = given[doc_id]
                fresh = [h for h in hashes if not any(covers_row(r, h) for r in unfinished)]
                if not hashes and not unfinished:
                    fresh = [None]
                covering = [
                    r for r in unfinished if not hashes or any(covers_row(r, h) for h in hashes)
                ]
                holders = [
                    v
                    for v in read_versions_containing(conn, doc_id)
                    if v.status in (AdapterStatus.ACTIVE, AdapterStatus.TRAINING)
                ]
                todo.append((doc_id, fresh, covering, holders))
            revoking = any(v.status == AdapterStatus.ACTIVE for *_, held in todo for v in held)
            changed = revoking or any(fresh or held for _, fresh, _, held in todo)
            orphaned = {
                r.job_id
                for _, _, covering, _ in todo
                for r in covering
                if read_job(conn, r.job_id).finished
            }
            if not changed and not orphaned:
                for doc_id, _, covering, _ in todo:
                    details = {"doc_id": doc_id, "job_id": covering[0].job_id, "repeat": True}
                    write_audit(conn, actor, "delete_requested", details | {"revoked": []})
                return None, [r for *_, covering, _ in todo for r in covering]
            job = read_job(conn, job_id) if job_id is not None else None
            if job is None or job.finished or job.kind != "delete":
                job = insert_job(conn, "delete", runner, actor)
            epoch = bump_epoch(conn) if revoking else int(read_meta(conn, "epoch"))
            records = []
            for doc_id, fresh, covering, holders in todo:
                revoked = _revoke_holders(conn, holders, epoch, actor, f"delete {doc_id}")
                ids = [r.deletion_id for r in covering]
                for content_hash in fresh:
                    ids.append(
                        _insert_deletion(
                            conn, doc_id, content_hash, job, actor, epoch, revoked, shards, now
                        )
                    )
                for record in covering:  # what this request revoked is theirs too
                    if revoked:
                        merged = sorted({(r.id, r.version) for r in (*record.revoked, *revoked)})
                        conn.execute(
                            "UPDATE deletions SET revoked = ?, epoch = ?, updated_at = ? "
                            "WHERE deletion_id = ?",
                            (json.dumps(merged), epoch, now, record.deletion_id),
                        )
                    if record.job_id in orphaned:  # its job ended unfinished: this one goes on
                        conn.execute(
                            "UPDATE deletions SET job_id = ?, updated_at = ? WHERE deletion_id = ?",
                            (job.job_id, now, record.deletion_id),
                        )
                details = {"doc_id": doc_id, "job_id": job.job_id, "epoch": epoch}
                details |= {"revoked": [f"{r.id}@v{r.version}" for r in revoked]}
                details |= {"content_hashes": fresh} if fresh else {"repeat": True}
                write_audit(conn, actor, "delete_requested", details)
                records += [_deletion_by_id(conn, i) for i in ids]
            return job, records

    def advance_deletion(
        self: Transactions,
        deletions: Iterable[DeletionRecord | int],
        state: DeletionState,
        *,
        actor: str = "system",
        **details: Any,
    ) -> list[DeletionRecord]:
        """Move deletions (records or ids) forward to ``state``; those there or beyond stay."""
        state = DeletionState(state)
        wanted = {d.deletion_id if isinstance(d, DeletionRecord) else int(d) for d in deletions}
        with self._write() as conn:
            moved = []
            for deletion_id in sorted(wanted):
                current = _deletion_by_id(conn, deletion_id)
                if _DELETION_ORDER.index(current.state) >= _DELETION_ORDER.index(state):
                    continue
                conn.execute(
                    "UPDATE deletions SET state = ?, updated_at = ? WHERE deletion_id = ?",
                    (state.value, timestamp(), deletion_id),
                )
                keys = {"doc_id": current.doc_id, "content_hash": current.content_hash}
                write_audit(conn, actor, f"delete_{state.value}", keys | details)
                moved.append(_deletion_by_id(conn, deletion_id))
            return moved

    def deletion(self: Transactions, doc_id: str) -> DeletionRecord:
        """The latest deletion of ``doc_id``; NotFound if it was never deleted."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM deletions WHERE doc_id = ? ORDER BY deletion_id DESC LIMIT 1",
                (doc_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"document {doc_id!r} has no deletion")
        return deletion_from_row(row)

    def deletions(self: Transactions, doc_id: str | None = None) -> list[DeletionRecord]:
        """Every deletion (of ``doc_id``, if given), finished or not, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM deletions WHERE ?1 IS NULL OR doc_id = ?1 ORDER BY deletion_id",
                (doc_id,),
            ).fetchall()
        return [deletion_from_row(r) for r in rows]

    def unfinished_deletions(self: Transactions) -> list[DeletionRecord]:
        """Deletions not yet purged, oldest first: the work a delete job (re)does."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM deletions WHERE state != 'purged' ORDER BY deletion_id"
            ).fetchall()
        return [deletion_from_row(r) for r in rows]
