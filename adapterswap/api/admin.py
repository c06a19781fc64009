"""The admin half of the gateway: documents, training, jobs, the audit log. No Ray here.

Every method needs the admin role (:func:`~adapterswap.api.auth.require_admin`). A delete or
a replacing ingest answers only once every live model replica has dropped the revoked
versions (the deletion barrier), and the job that retrains and purges runs whatever the
barrier answered: the revocation stands either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyarrow.compute as pc

from adapterswap.api.auth import require_admin
from adapterswap.api.schemas import DocumentsRequest
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_lock, ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import AdapterSwapConfig
from adapterswap.delete.job import DeleteRequest, request_delete, wait_for_replicas
from adapterswap.errors import NotFound
from adapterswap.route.active_set import ActiveSet
from adapterswap.store.jobs import Jobs
from adapterswap.store.protocol import Store
from adapterswap.store.records import DeletionState, covers_row
from adapterswap.types import Embed, Principal


class AdminEndpoints:
    """``/v1/documents``, ``/v1/train``, ``/v1/jobs``, ``/v1/audit``.

    A part of :class:`~adapterswap.api.gateway.Gateway`, which sets these attributes.
    """

    config: AdapterSwapConfig
    active: ActiveSet
    store: Store
    jobs: Jobs
    replica_alive: Callable[[str], bool] | None
    _embed: Embed

    def ingest(self, principal: Principal, body: DocumentsRequest) -> dict[str, Any]:
        """``POST /v1/documents``: validated as a whole, like ``adapterswap ingest``.

        With ``replace: true`` an id that exists is a delete plus an ingest. Every field is
        validated and the new catalog fragment built first, so a bad body changes nothing.
        Then, under the ingest lock, every version holding the id is revoked, the old row
        removed (its deletion recorded ``removed``) and the new one written; the answer comes
        once every replica has dropped the revoked versions (503 if one does not in time:
        replaced, with the revocation in force). The delete job retrains and purges.
        """
        require_admin(principal)
        actor = f"api:{principal.user}"
        records = [
            RawRecord(f"documents[{i}]", d.model_dump(exclude_none=True))
            for i, d in enumerate(body.documents)
        ]
        deleted: list[DeleteRequest] = []

        def replace(doc_ids: list[str]) -> None:  # called under the ingest lock
            catalog = Catalog(self.config.storage)
            request = request_delete(self.store, catalog, doc_ids, self.jobs.runner, actor)
            deleted.append(request)
            # Only the contents recorded now go; the deletions say so at once, so the job's
            # removal never matches the replacement, even one with the very same text.
            catalog.remove(doc_ids, {d: request.held.get(d, []) for d in doc_ids})
            removed = [
                r for r in request.records if r.content_hash in request.held.get(r.doc_id, [])
            ]
            self.store.advance_deletion(removed, DeletionState.REMOVED, actor=actor)

        try:
            result = ingest_records(
                records,
                self.config,
                embed=self._embed,
                audit=self.store,
                actor=actor,
                replace=replace if body.replace else None,
            )
            if deleted:
                self._wait_for_replicas(deleted[0].epoch)
        finally:  # the job runs whatever happened after the revocation: it stands
            if deleted and deleted[0].job is not None:
                self.jobs.start_deletion(deleted[0].job)
        answer: dict[str, Any] = {
            "accepted": result.accepted,
            "batch": result.batch,
            "shards": [p.shard for p in result.shards],
        }
        if deleted:
            answer |= {
                "replaced": result.replaced,
                "revoked": deleted[0].revoked,
                "job": deleted[0].job_id,
            }
        return answer

    def _wait_for_replicas(self, epoch: int) -> float:
        """The deletion barrier, after syncing the ingress's own view.

        Returns once every live model replica acknowledged ``epoch``: it evicted the revoked
        versions and stopped every generation in flight that used them, so no token is
        produced with a revoked version after this returns. A live replica that does not
        acknowledge in time raises RevocationTimeout (503); the revocation stays in force.
        """
        self.active.sync()
        return wait_for_replicas(
            self.store,
            epoch,
            timeout_s=self.config.serve.revocation_timeout_s,
            is_alive=self.replica_alive,
        )

    def document(self, principal: Principal, doc_id: str) -> dict[str, Any]:
        """``GET /v1/documents/{id}``: metadata, placement and the versions that saw it."""
        require_admin(principal)
        rows = (
            Catalog(self.config.storage)
            .read(
                ["id", "group", "batch", "shard", "content_hash", "ingested_at", "metadata"],
                filter=pc.field("id") == doc_id,
            )
            .to_pylist()
        )
        if not rows:
            raise NotFound(f"document {doc_id!r} not found")
        row = rows[0]
        versions = [
            {"id": v.adapter_id, "version": v.version, "status": v.status}
            for v in self.store.versions_containing(doc_id)
        ]
        unfinished = [d for d in self.store.deletions(doc_id) if d.state != DeletionState.PURGED]
        deletions = [
            {"content_hash": d.content_hash, "state": d.state.value, "job": d.job_id}
            for d in unfinished
        ]
        covered = any(covers_row(d, row["content_hash"]) for d in unfinished)
        row["metadata"] = json.loads(row["metadata"])
        row["ingested_at"] = row["ingested_at"].isoformat()
        status = "deleting" if covered else "active"
        return {**row, "status": status, "adapters": versions, "deletions": deletions}

    def delete_document(self, principal: Principal, doc_id: str) -> dict[str, Any]:
        """``DELETE /v1/documents/{id}``: answers once every live replica dropped its versions.

        Every version holding the id is revoked, whatever earlier deletions or replacements
        of it are unfinished, and whatever content the catalog holds for it is deleted, so a
        200 always means the document is going for good. Retraining and purging go on in the
        returned job (a repeat answers the job carrying the deletion on: a new one if the old
        ended unfinished). An unknown id, or one whose deletions have all finished, is a 404.
        """
        require_admin(principal)
        request = request_delete(
            self.store,
            Catalog(self.config.storage),
            [doc_id],
            self.jobs.runner,
            f"api:{principal.user}",
            lock=lambda: ingest_lock(self.store),  # no replacement lands between read and revoke
        )
        try:
            waited = self._wait_for_replicas(request.epoch)
        finally:  # the job runs even when the barrier times out: the revocation stands
            if request.job is not None:
                self.jobs.start_deletion(request.job)
        return {
            "revoked": request.revoked,
            "job": request.job_id,
            "acknowledged_after_s": round(waited, 3),
        }

    def submit_training(self, principal: Principal) -> dict[str, Any]:
        """``POST /v1/train``: a job that trains every shard whose content changed."""
        require_admin(principal)
        job = self.jobs.submit_training(principal.user)
        return {"job": job.job_id, "state": job.state.value}

    def job(self, principal: Principal, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: state, progress, result and error of a job."""
        require_admin(principal)
        job = self.jobs.get(job_id)
        return {
            "id": job.job_id,
            "object": "job",
            "kind": job.kind,
            "state": job.state.value,
            "submitted_by": job.actor,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "progress": job.progress,
            "result": job.result,
            "error": job.error,
        }

    def audit(self, principal: Principal, since: int, limit: int) -> dict[str, Any]:
        """``GET /v1/audit``: the append-only log, oldest first, after ``since``."""
        require_admin(principal)
        entries = self.store.audit_log(since, min(max(limit, 1), 1000))
        return {"object": "list", "data": [asdict(e) for e in entries]}
