"""Jobs (training, deletion) as rows of the store, so ``GET /v1/jobs/{id}`` and
``adapterswap status`` read them wherever the job runs.

A job moves ``pending -> running -> succeeded | failed`` (or ``pending -> failed``); running
again is a progress update. Its end is audited. Mixed into
:class:`~adapterswap.store.registry.AdapterRegistry`, which provides the transactions.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable
from typing import Any

from adapterswap.errors import IllegalTransition, NotFound
from adapterswap.store.core import Transactions, write_audit
from adapterswap.store.records import JobRecord, JobState, job_from_row, timestamp

# target state -> the states a job may move to it from.
_JOB_FROM: dict[JobState, tuple[JobState, ...]] = {
    JobState.RUNNING: (JobState.PENDING, JobState.RUNNING),  # running again: a progress update
    JobState.SUCCEEDED: (JobState.RUNNING,),
    JobState.FAILED: (JobState.PENDING, JobState.RUNNING),
}


def insert_job(conn: sqlite3.Connection, kind: str, runner: str, actor: str) -> JobRecord:
    """Record a new ``pending`` job in the caller's transaction (audited)."""
    job_id = f"{kind}-{uuid.uuid4().hex[:12]}"
    now = timestamp()
    conn.execute(
        "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, '{}', NULL, NULL)",
        (job_id, kind, JobState.PENDING.value, runner, actor, now, now),
    )
    write_audit(conn, actor, "submit_job", {"job_id": job_id, "kind": kind})
    return read_job(conn, job_id)


def read_job(conn: sqlite3.Connection, job_id: str) -> JobRecord:
    """One job, in the caller's transaction; NotFound if there is none."""
    row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise NotFound(f"job_id: no job {job_id!r}")
    return job_from_row(row)


class JobRecords:
    """Create, update and read jobs (each call is one transaction)."""

    def create_job(
        self: Transactions, kind: str, runner: str, *, actor: str = "system"
    ) -> JobRecord:
        """Record a new ``pending`` job; its id is ``<kind>-<12 hex digits>``."""
        with self._write() as conn:
            return insert_job(conn, kind, runner, actor)

    def update_job(
        self: Transactions,
        job_id: str,
        state: JobState,
        *,
        progress: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        actor: str = "system",
    ) -> JobRecord:
        """Move a job to ``state`` (running again: a progress update); audits the end."""
        state = JobState(state)
        with self._write() as conn:
            current = read_job(conn, job_id)
            if current.state not in _JOB_FROM[state]:
                raise IllegalTransition(
                    f"job {job_id} is {current.state}; it cannot become {state}"
                )
            conn.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, progress = ?, result = ?, error = ? "
                "WHERE job_id = ?",
                (
                    state.value,
                    timestamp(),
                    json.dumps(current.progress if progress is None else progress),
                    None if result is None else json.dumps(result),
                    error,
                    job_id,
                ),
            )
            if state in (JobState.SUCCEEDED, JobState.FAILED):
                details = {"job_id": job_id, "kind": current.kind, "state": state.value}
                write_audit(
                    conn, actor, "finish_job", details | ({"error": error} if error else {})
                )
            return read_job(conn, job_id)

    def get_job(self: Transactions, job_id: str) -> JobRecord:
        with self._read() as conn:
            return read_job(conn, job_id)

    def list_jobs(
        self: Transactions, states: Iterable[str] | None = None, limit: int = 100
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally only in ``states``."""
        wanted = [JobState(s).value for s in states] if states is not None else list(JobState)
        marks = ", ".join("?" * len(wanted))
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at DESC LIMIT ?",
                (*wanted, limit),
            ).fetchall()
        return [job_from_row(r) for r in rows]
