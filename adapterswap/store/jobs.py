"""Jobs: long work (training, deletion) that reports to its row in the store. No Ray here.

A job is created ``pending`` by whoever submits it (``POST /v1/train``, ``adapterswap
train``), then the code doing the work holds a :class:`JobReporter`: ``start`` once it owns
the home's lock for that kind of work (jobs of one kind queue on it), throttled
``progress`` while it runs, then ``finish``. Since the lock serialises a kind, a job of that
kind still ``running`` when the next one takes the lock was interrupted (its process or actor
died): ``start`` fails it, so no job stays ``running`` forever.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from adapterswap.store.locks import exclusive
from adapterswap.store.records import JobRecord, JobState
from adapterswap.store.registry import AdapterRegistry

PROGRESS_INTERVAL_S = 1.0


@contextmanager
def running_job(registry: AdapterRegistry, kind: str, job_id: str | None) -> Iterator[JobReporter]:
    """Run a job's body under the store's ``train`` lock (training and deletion take turns).

    Yields the started reporter; the body calls ``finish``. If the body raises, the job is
    recorded failed with the exception, which propagates.
    """
    job = JobReporter.open(registry, kind, job_id)
    with exclusive(registry, "train"):
        job.start()
        try:
            yield job
        except BaseException as exc:
            job.finish({}, error=f"{type(exc).__name__}: {exc}")
            raise


def process_runner() -> str:
    """The runner name of work done by this process (a CLI, a ``ray job submit`` entry point)."""
    return f"process:{socket.gethostname()}:{os.getpid()}"


class Jobs(Protocol):
    """How the gateway submits and reads jobs (on Ray: ``actors.job_runner.RayJobs``)."""

    runner: str  # the runner column of the jobs it starts

    def submit_training(self, actor: str) -> JobRecord: ...

    def start_deletion(self, job: JobRecord) -> None:
        """Run the delete job ``begin_delete`` created (it finishes every pending deletion)."""

    def get(self, job_id: str) -> JobRecord: ...


class JobReporter:
    """A running job's link to its row: start, throttled progress, and its outcome."""

    def __init__(self, registry: AdapterRegistry, job: JobRecord) -> None:
        self.registry = registry
        self.job_id, self.kind = job.job_id, job.kind
        self._progress: dict[str, Any] = {}
        self._written = 0.0

    @classmethod
    def open(cls, registry: AdapterRegistry, kind: str, job_id: str | None) -> JobReporter:
        """The reporter of ``job_id``, or of a new job of ``kind`` run by this process."""
        job = (
            registry.get_job(job_id)
            if job_id is not None
            else registry.create_job(kind, process_runner(), actor=kind)
        )
        return cls(registry, job)

    def start(self) -> list[str]:
        """Mark the job running, failing jobs of its kind left running by a dead runner."""
        stale = [
            job.job_id
            for job in self.registry.list_jobs(states=[JobState.RUNNING])
            if job.kind == self.kind and job.job_id != self.job_id
        ]
        for job_id in stale:
            self.registry.update_job(
                job_id, JobState.FAILED, error="interrupted: its runner stopped before the end"
            )
        self.registry.update_job(self.job_id, JobState.RUNNING)
        return stale

    def forwarding(
        self, on_progress: Callable[[dict[str, Any]], None] | None
    ) -> Callable[[dict[str, Any]], None]:
        """A progress callback that records to the row and passes events on (CLI bars)."""

        def progress(event: dict[str, Any]) -> None:
            self.progress(event)
            if on_progress is not None:
                on_progress(event)

        return progress

    def progress(self, event: dict[str, Any]) -> None:
        """A training step event: kept per shard, written at most once per interval."""
        self._progress[event["shard"]] = {
            "step": event["step"],
            "max_steps": event["max_steps"],
            "loss": event["loss"],
        }
        now = time.monotonic()
        if now - self._written >= PROGRESS_INTERVAL_S:
            self._written = now
            self.registry.update_job(self.job_id, JobState.RUNNING, progress=self._progress)

    def finish(self, result: dict[str, Any], error: str | None = None) -> JobRecord:
        """Record the outcome: failed when ``error`` is given, else succeeded."""
        state = JobState.FAILED if error else JobState.SUCCEEDED
        return self.registry.update_job(
            self.job_id, state, progress=self._progress, result=result, error=error
        )
