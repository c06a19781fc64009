"""Job runners: one detached actor per kind of job (``train-runner``, ``delete-runner``).

``POST /v1/train`` and ``DELETE /v1/documents/{id}`` record a ``pending`` job in the store,
then queue it on its kind's runner, which runs its jobs one after the other (they would
queue on the home's lock anyway) with :func:`adapterswap.train.job.run_training` or
:func:`adapterswap.delete.job.run_deletion`; those report progress and the outcome to the
job's row. One long-lived process per kind, not one per job: a burst of deletes queues
cheap tasks instead of starting processes. The runners live on the head node, where the
home (its locks, the store's SQLite file) is. A runner that dies leaves its jobs pending or
running: :meth:`RayJobs.get` fails them once their runner is gone, and the next job of the
kind fails a running one too (see ``adapterswap.store.jobs``).
"""

from __future__ import annotations

from typing import Any

import ray

from adapterswap.config import AdapterSwapConfig
from adapterswap.storage.privacy import private_process
from adapterswap.store.protocol import Store
from adapterswap.store.records import JobRecord, JobState

_HEAD_NODE = {"node:__internal_head__": 0.001}
RUNNER = "ray-actor"  # the job's runner column; the actor is named "<kind>-runner"


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class JobRunner:
    """Runs the jobs of one kind, in the order they were queued."""

    def run(self, kind: str, config: dict[str, Any], job_id: str) -> None:
        from actors.train_launcher import train_shards_with_ray
        from adapterswap.delete.job import run_deletion
        from adapterswap.store.registry import AdapterRegistry
        from adapterswap.train.job import run_training

        private_process()
        settings = AdapterSwapConfig.model_validate(config)
        work = {"train": run_training, "delete": run_deletion}[kind]
        registry = AdapterRegistry(settings.db_path)
        work(settings, registry, train_shards=train_shards_with_ray, job_id=job_id)


class RayJobs:
    """Submit and read jobs on the cluster, their rows through ``store`` (the store's client)."""

    runner = RUNNER

    def __init__(self, config: AdapterSwapConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def submit_training(self, actor: str) -> JobRecord:
        """A ``pending`` training job, its runner started (it queues behind a running one)."""
        job = self.store.create_job("train", RUNNER, actor=actor)
        self._start(job)
        return job

    def start_deletion(self, job: JobRecord) -> None:
        self._start(job)

    def resume_deletions(self) -> JobRecord | None:
        """Start a delete job if a crash left deletions unfinished (called at start-up)."""
        if not self.store.unfinished_deletions():
            return None
        job = self.store.create_job("delete", RUNNER, actor="recovery")
        self._start(job)
        return job

    def _start(self, job: JobRecord) -> None:
        runner = JobRunner.options(
            name=f"{job.kind}-runner",
            namespace=self.config.ray.namespace,
            lifetime="detached",
            get_if_exists=True,
            resources=_HEAD_NODE,
        ).remote()
        runner.run.remote(job.kind, self.config.model_dump(), job.job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job's row; an unfinished job whose runner actor is gone is failed."""
        job = self.store.get_job(job_id)
        if job.finished or job.runner != RUNNER:
            return job
        try:
            ray.get_actor(f"{job.kind}-runner", namespace=self.config.ray.namespace)
        except ValueError:
            job = self.store.get_job(job_id)  # it may have finished and exited meanwhile
            if not job.finished:
                job = self.store.update_job(
                    job_id, JobState.FAILED, error="its runner actor died before the end"
                )
        return job
