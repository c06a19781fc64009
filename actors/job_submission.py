"""Hand a CLI command to a running cluster as a Ray job (``ray job submit``'s client).

``adapterswap train`` and ``adapterswap delete`` submit ``python -m adapterswap ... --wait``
(or ``--finish``) here when a job server answers, and do the work in their own process
when none does.
"""

from __future__ import annotations

import os
import shlex

from ray.job_submission import JobSubmissionClient

from adapterswap.config import AdapterSwapConfig

DEFAULT_JOB_SERVER = "http://127.0.0.1:8265"


def submit_ray_job(config: AdapterSwapConfig, args: list[str]) -> str | None:
    """Submit ``python -m adapterswap ARGS`` as a Ray job; None when no job server answers.

    The job server is ``RAY_ADDRESS``, else ``ray.address``, else the local dashboard.
    """
    address = os.environ.get("RAY_ADDRESS") or config.ray.address or DEFAULT_JOB_SERVER
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError):
        return None
    return client.submit_job(entrypoint=shlex.join(["python", "-m", "adapterswap", *args]))
