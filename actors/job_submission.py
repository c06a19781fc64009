"""Hand a CLI command to a cluster's job server as a Ray job (``ray job submit``'s client).

``adapterswap train`` and ``adapterswap delete`` submit ``python -m adapterswap ... --wait``
(or ``--finish``) here only when the user named a cluster (``--address``,
``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS`` or ``ray.address``: see
:mod:`actors.ray_address`); otherwise, and inside a Ray job, they work in their own process.
A named job server that does not answer, or refuses the token, is an error, never a silent
fallback to working here.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from ray.job_submission import JobSubmissionClient

from actors.ray_address import (
    CLUSTER_ENV,
    JOB_SERVER_ENV,
    NamedAddress,
    inside_ray_job,
    named_job_server,
    ray_errors,
)
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import NoCluster


class SubmittedJob(NamedTuple):
    """A submitted job's id and the job server's URL it went to."""

    job_id: str
    job_server: str


def where_to_submit(
    config: AdapterSwapConfig, given: str | None, *, wait: bool
) -> NamedAddress | None:
    """The job server to hand the work to; None: do it here (``--wait``, inside a Ray job, or
    no cluster named)."""
    return None if wait or inside_ray_job() else named_job_server(config, given)


def connect_job_server(where: NamedAddress) -> JobSubmissionClient:
    """A client of the job server at ``where``, which answered and took the token.

    NoCluster when nothing answers there; ConfigError when it refuses the token.
    """
    # JobSubmissionClient reads RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument; the
    # address resolved here (an explicit --address among them) must win.
    with _without_env(JOB_SERVER_ENV, CLUSTER_ENV), ray_errors(where.address):
        try:
            return JobSubmissionClient(where.address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise NoCluster(
                f"no Ray job server answers at {where.address} (from {where.source}: "
                f"{str(exc).splitlines()[0]}); start the cluster, correct {where.source}, or "
                "run the command here with --wait"
            ) from None


def submit_ray_job(client: JobSubmissionClient, args: list[str]) -> SubmittedJob:
    """Submit ``python -m adapterswap ARGS`` through ``client``."""
    with ray_errors(client.get_address()):
        job_id = client.submit_job(entrypoint=shlex.join(["python", "-m", "adapterswap", *args]))
    return SubmittedJob(job_id, client.get_address())


@contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
