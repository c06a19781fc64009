"""``adapterswap delete``: revoke and wait for the replicas, then retrain and purge in a job;
``adapterswap verify-forget``: check that a deleted document is forgotten.

``adapterswap delete DOC_ID...`` revokes in the store (one transaction) and returns once every
live serving replica has acknowledged it. The rest (catalog, retraining, purge) runs as a
Ray job when the user named a cluster (as for ``train``: ``--address``, ``RAY_API_SERVER_ADDRESS``,
``RAY_ADDRESS``, ``ray.address``), else here, with progress bars; ``--wait`` always runs it here. ``adapterswap delete --finish`` finishes every deletion a crash left unfinished.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from actors.cluster_status import replica_liveness
from actors.job_submission import connect_job_server, submit_ray_job, where_to_submit
from actors.ray_address import joining, ray_errors
from actors.train_launcher import train_shards_with_ray
from adapterswap.api.client import Client
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_lock
from adapterswap.catalog.readers import read_inputs
from adapterswap.cli.common import UsageError, forwarded_flags, open_registry
from adapterswap.cli.progress import ShardProgressBars
from adapterswap.config import AdapterSwapConfig
from adapterswap.delete.job import (
    DeletionReport,
    request_delete,
    run_deletion,
    wait_for_replicas,
)
from adapterswap.delete.verify_forget import http_scorer, verify_forget
from adapterswap.errors import DeletionFailed, ForgetCheckFailed
from adapterswap.store.jobs import process_runner
from adapterswap.store.registry import AdapterRegistry


def delete_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """``delete DOC_ID...`` or ``delete --finish``."""
    if args.finish == bool(args.doc_ids):
        raise UsageError("delete: give DOC_ID... or --finish (not both)")
    if args.finish:
        return finish_deletions(joining(config), open_registry(config), None, quiet=args.json)
    return delete_documents(
        config,
        open_registry(config),
        args.doc_ids,
        wait=args.wait,
        address=args.address,
        forward=forwarded_flags(args),
        quiet=args.json,
        is_alive=replica_liveness(config),
    )


def delete_documents(
    config: AdapterSwapConfig,
    registry: AdapterRegistry,
    doc_ids: list[str],
    *,
    wait: bool,
    forward: list[str],
    quiet: bool,
    address: str | None = None,
    is_alive: Callable[[str], bool] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The ``delete`` command: its text and JSON payload (``is_alive``: see
    :func:`~adapterswap.delete.job.wait_for_replicas`)."""
    # A job server that will not take the job fails the command before anything is revoked.
    where = where_to_submit(config, address, wait=wait)
    job_server = connect_job_server(where) if where is not None else None
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
    if job_server is not None:
        job = submit_ray_job(job_server, [*forward, "delete", "--finish"])
        lines.append(
            f"retraining and purging in Ray job {job.job_id} at {job.job_server}: "
            f"ray job logs -f {job.job_id} --address {job.job_server}"
        )
        return "\n".join(lines), payload | {"ray_job": job.job_id, "job_server": job.job_server}
    text, report = finish_deletions(joining(config, address), registry, request.job_id, quiet=quiet)
    return "\n".join([*lines, text]), payload | report


def finish_deletions(
    config: AdapterSwapConfig, registry: AdapterRegistry, job_id: str | None, *, quiet: bool
) -> tuple[str, dict[str, Any]]:
    """Run the delete job here (``--finish``, or after a request); raises DeletionFailed."""
    bars = None if quiet else ShardProgressBars()
    try:
        with ray_errors(config.ray.address or "the local Ray"):
            report = run_deletion(
                config,
                registry,
                train_shards=train_shards_with_ray,
                job_id=job_id,
                on_progress=bars,
            )
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


def verify_forget_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Score the deleted document against never-ingested controls of its group, over HTTP."""
    key = args.key or os.environ.get("ADAPTERSWAP_API_KEY")
    if not key:
        raise UsageError("verify-forget: give --key or set ADAPTERSWAP_API_KEY")
    source = [r.fields for r in read_inputs([args.source]).records]
    doc = next((r for r in source if r.get("id") == args.doc_id), None)
    if doc is None:
        raise UsageError(f"verify-forget: {args.source} has no record with id {args.doc_id!r}")
    group = doc.get("group")
    controls = [
        r["text"]
        for r in (r.fields for r in read_inputs([args.controls_file]).records)
        if r.get("group") == group and r.get("id") != args.doc_id
    ][: args.controls]
    with Client(args.url, key) as client:
        report = verify_forget(args.doc_id, group, doc["text"], controls, http_scorer(client))
    if not report.passed:
        raise ForgetCheckFailed(report.summary())
    return report.summary(), asdict(report)
