"""What the tests on a Ray cluster share: one local cluster per module, always shut down, and
the AdapterSwap Serve app started on it. Every test here is marked ``ray`` (tests/conftest.py),
so ``make test-fast`` leaves it out. Modules that need another shape of cluster
(test_multinode: a head and two worker nodes; test_train_job_submission: a job server) build
their own with ``ray.cluster_utils.Cluster``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray
from ray import serve
from support import free_port

from actors.serve_app import build_app
from adapterswap.config import AdapterSwapConfig


@pytest.fixture(scope="module")
def ray_init_options() -> dict[str, Any]:
    """More ``ray.init`` arguments for the module's cluster: a module overrides this fixture
    to add its own (test_serve: the metrics export port)."""
    return {}


@pytest.fixture(scope="module")
def ray_cluster(ray_init_options: dict[str, Any]) -> Iterator[None]:
    """A local Ray cluster for the module: 2 CPUs (this machine's), no dashboard, and the
    workers' logs kept off the test output."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        **ray_init_options,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_app(ray_cluster: None) -> Iterator[Callable[..., int]]:
    """``port = serve_app(config, num_replicas=1)`` serves the AdapterSwap app for ``config``
    on a free loopback port, on the module's ``ray_cluster``; Serve is shut down with the
    module, before Ray."""

    def start(config: AdapterSwapConfig, num_replicas: int = 1) -> int:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(
                {"home": config.home, "config": config.model_dump(), "num_replicas": num_replicas}
            ),
            name="adapterswap",
            route_prefix="/",
        )
        return port

    try:
        yield start
    finally:
        serve.shutdown()
