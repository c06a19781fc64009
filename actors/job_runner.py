"""Job runners: one detached actor per submitted job, on the head node, gone when it is done.

``POST /v1/train`` records a ``pending`` job in the store, then starts a runner named after
it; the runner calls :func:`adapterswap.train_job.run_training` with that job id, which
reports progress and the outcome to the job's row. The runner lives on the head node, where
the home (its locks, the store's SQLite file) is. A runner that dies leaves its job
``running``: :meth:`RayJobs.get` fails such a job when its actor is gone, and the next job of
its kind would too (see ``adapterswap.jobs``).
"""

from __future__ import annotations

from typing import Any

import ray

from adapterswap.config import AdapterSwapConfig
from adapterswap.registry import JobRecord, JobState

_HEAD_NODE = {"node:__internal_head__": 0.001}
RUNNER = "ray-actor"  # the job's runner column; the actor is named "<job id>-runner"


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class JobRunner:
    """Runs one job to its end, then exits."""

    def run(self, kind: str, config: dict[str, Any], job_id: str) -> None:
        from adapterswap.deletion import run_deletion
        from adapterswap.registry import AdapterRegistry
        from adapterswap.train_job import run_training

        settings = AdapterSwapConfig.model_validate(config)
        work = {"train": run_training, "delete": run_deletion}[kind]
        try:
            work(settings, AdapterRegistry(settings.db_path), job_id=job_id)
        finally:
            ray.actor.exit_actor()


class RayJobs:
    """Submit and read jobs on the cluster; ``store`` answers registry methods synchronously."""

    runner = RUNNER

    def __init__(self, config: AdapterSwapConfig, store: Any) -> None:
        self.config = config
        self.store = store

    def submit_training(self, actor: str) -> JobRecord:
        """A ``pending`` training job, its runner started (it queues behind a running one)."""
        job = self.store.create_job("train", RUNNER, actor=actor)
        self._start(job)
        return job

    def start_deletion(self, job: JobRecord) -> None:
        self._start(job)

    def _start(self, job: JobRecord) -> None:
        runner = JobRunner.options(
            name=f"{job.job_id}-runner",
            namespace=self.config.ray.namespace,
            lifetime="detached",
            resources=_HEAD_NODE,
        ).remote()
        runner.run.remote(job.kind, self.config.model_dump(), job.job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job's row; a job whose runner actor is gone without finishing it is failed."""
        job = self.store.get_job(job_id)
        if job.finished or job.runner != RUNNER:
            return job
        try:
            ray.get_actor(f"{job.job_id}-runner", namespace=self.config.ray.namespace)
        except ValueError:
            job = self.store.get_job(job_id)  # it may have finished and exited meanwhile
            if not job.finished:
                job = self.store.update_job(
                    job_id, JobState.FAILED, error="its runner actor died before the end"
                )
        return job
