"""``adapterswap delete``: revoke and wait for the replicas, then retrain and purge in a job.

``adapterswap delete DOC_ID...`` revokes in the store (one transaction) and returns once every
live serving replica has acknowledged it. The rest (catalog, retraining, purge) runs as a
Ray job when a cluster's job server answers, else here, with progress bars; ``--wait`` always
runs it here. ``adapterswap delete --finish`` finishes every deletion a crash left unfinished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_lock
from adapterswap.config import AdapterSwapConfig
from adapterswap.delete.job import (
    DeletionReport,
    request_delete,
    run_deletion,
    wait_for_replicas,
)
from adapterswap.errors import AdapterSwapError
from adapterswap.jobs import process_runner, submit_ray_job
from adapterswap.store.registry import AdapterRegistry


class DeletionFailed(AdapterSwapError):
    """The documents stay revoked, but retraining or purging failed; rerun --finish."""


def delete_documents(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    doc_ids: list[str],
    *,
    wait: bool,
    forward: list[str],
    quiet: bool,
    is_alive: Callable[[str], bool] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The ``delete`` command: its text and JSON payload (``is_alive``: see
    :func:`~adapterswap.delete.job.wait_for_replicas`)."""
    request = request_delete(
        registry,
        Catalog(config.storage),
        doc_ids,
        process_runner(),
        "cli",
        lock=lambda: ingest_lock(registry),  # no ingest or replace lands between read and revoke
    )
    waited = wait_for_replicas(
        registry,
        request.epoch,
        timeout_s=config.serve.revocation_timeout_s,
        is_alive=is_alive,
    )
    revoked = ", ".join(f"{r['id']} v{r['version']}" for r in request.revoked) or "none"
    lines = [
        f"revoked: {revoked} (every live replica acknowledged after {waited:.2f} s)",
    ]
    payload: dict[str, Any] = {"revoked": request.revoked, "job": request.job_id}
    if request.job is None:
        lines.append(f"already being deleted by job {request.job_id}")
        return "\n".join(lines), payload
    submitted = None if wait else submit_ray_job(config, [*forward, "delete", "--finish"])
    if submitted is not None:
        lines.append(f"retraining and purging in Ray job {submitted}: ray job logs -f {submitted}")
        return "\n".join(lines), payload | {"ray_job": submitted}
    text, report = finish_deletions(config, registry, request.job_id, quiet=quiet)
    return "\n".join([*lines, text]), payload | report


def finish_deletions(
    config: AdapterSwapConfig, registry: AdapterRegistry, job_id: str | None, *, quiet: bool
) -> tuple[str, dict[str, Any]]:
    """Run the delete job here (``--finish``, or after a request); raises DeletionFailed."""
    from dataclasses import asdict

    from adapterswap.progress import ShardProgressBars

    bars = None if quiet else ShardProgressBars()
    try:
        report = run_deletion(config, registry, job_id=job_id, on_progress=bars)
    finally:
        if bars is not None:
            bars.close()
    text = format_report(report)
    failed = report.training.get("failed", [])
    if failed:
        raise DeletionFailed(
            f"{text}\nretraining failed for {', '.join(f['id'] for f in failed)}; the documents "
            "stay revoked; run `adapterswap delete --finish` to retry"
        )
    return text, asdict(report)


def format_report(report: DeletionReport) -> str:
    if not report.documents:
        return "no unfinished deletions"
    trained = report.training.get("trained", [])
    return "\n".join(
        [
            f"deleted {len(report.documents)} document(s): {', '.join(report.documents)}",
            f"  catalog fragments rewritten: {len(report.catalog_fragments)}",
            "  retrained: "
            + (", ".join(f"{t['id']} v{t['version']}" for t in trained) or "nothing"),
            f"  retired (now empty): {', '.join(report.retired) or 'none'}",
            f"  purged versions: {', '.join(report.purged) or 'none'}",
        ]
    )
