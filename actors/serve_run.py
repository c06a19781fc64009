"""Starting Ray and Serve from the command line: ``adapterswap serve`` and the demo.

:func:`ray_started` joins the configured cluster (or starts a local one) for a block and shuts
it down after; :func:`app_served` deploys the Serve application for a block. With a
``ray_log`` file, Ray's own output goes there instead of the terminal (the demo's terminal
shows its story and its progress bars only). Ray talks to the driver's terminal in three ways,
each redirected here:

- its Python loggers (``ray``, ``ray.serve``, ``ray.data``, ...), whose console handlers it
  installs at import and again in ``ray.init`` and ``serve.start``;
- Python warnings raised in its modules;
- what the raylet and the core worker push to the driver (worker start-up warnings, retried
  tasks), printed by a thread of the driver through ``print_to_stdstream``.

The raylet's, the GCS's and the workers' own logs stay where Ray writes them, in the session's
``logs/`` directory (``ray_log`` names it).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import ray
import ray._private.worker as ray_worker
from ray import serve
from ray._private.utils import read_ray_address

from actors.ray_address import check_gcs_answers, driver_address, ray_errors
from actors.serve_app import build_app
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import ConfigError
from adapterswap.models.base import check_model_spec

RAY_PACKAGE = str(Path(ray.__file__).parent)


@contextmanager
def ray_started(
    address: str | None,
    *,
    namespace: str | None = None,
    include_dashboard: bool | None = None,
    ray_log: Path | None = None,
    metrics_export_port: int | None = None,
) -> Iterator[None]:
    """Ray for the block: ``ray.init(address, ...)``, then ``ray.shutdown()`` however it ends.

    ``ray_log``: Ray's output goes to this file (see the module docstring), not the terminal.
    ``metrics_export_port``: where a Ray started here exports its Prometheus metrics.
    """
    with ExitStack() as stack:
        if ray_log is not None:
            stack.enter_context(_ray_output_to(ray_log))
        check_gcs_answers(address)
        with ray_errors(address or "the local Ray"):
            ray.init(
                address=address,
                namespace=namespace,
                include_dashboard=include_dashboard,
                log_to_driver=False,
                _metrics_export_port=metrics_export_port,
            )
        stack.callback(ray.shutdown)
        _reroute_ray_loggers()  # ray.init may have set up console handlers again
        node = ray_worker._global_node  # None when joined through a Ray client
        if ray_log is not None and node is not None:
            logs = node.get_logs_dir_path()
            logging.getLogger("ray").info("the session's own logs (raylet, GCS, workers): %s", logs)
        yield


@contextmanager
def app_served(app_args: dict[str, Any], host: str, port: int) -> Iterator[None]:
    """The Serve application (``build_app(app_args)``) on ``host:port`` for the block.

    On the way out, Serve drains in-flight requests before it shuts down.
    """
    serve.start(http_options={"host": host, "port": port})
    try:
        _reroute_ray_loggers()  # serve.start configured Serve's logger
        serve.run(build_app(app_args), name="adapterswap", route_prefix="/")
        yield
    finally:
        serve.shutdown()


def serve_until_stopped(config: AdapterSwapConfig, host: str, port: int) -> None:
    """Deploy the Serve application on ``host:port`` and block until SIGINT or SIGTERM.

    Joins the named cluster (RAY_ADDRESS, else ``ray.address``), else Ray's default: the
    cluster ``ray start`` started here, else a new local one, exporting its metrics on
    ``ray.metrics_export_port``. What a user can get wrong (the model, a port in use, the
    address) is checked before Ray starts. The app gets the whole configuration this command
    resolved (file, environment, ``--set``). Prints the API's and the metrics' URLs.
    """
    address = driver_address(config)
    check_model_spec(config.model.spec)
    metrics_port = None
    if address is None:  # Serve's proxy binds here
        _check_port_free(host, port, "--port")
        if read_ray_address() is None:  # no `ray start` cluster to join: Ray starts here
            metrics_port = config.ray.metrics_export_port
            _check_port_free("0.0.0.0", metrics_port, "ray.metrics_export_port")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal during start-up stops once it is up
        signal.signal(sig, lambda *_: stop.set())
    args = {"home": config.home, "config": config.model_dump(), "num_replicas": 1}
    with (
        ray_started(address, namespace=config.ray.namespace, metrics_export_port=metrics_port),
        app_served(args, host, port),
    ):
        print(f"AdapterSwap serving on http://{host}:{port} (Ctrl-C to stop)", flush=True)
        print(f"Prometheus metrics on {', '.join(metrics_urls())}", flush=True)
        stop.wait()


def metrics_urls() -> list[str]:
    """Where each live node of the joined cluster exports its Prometheus metrics."""
    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"]
    ]


def _check_port_free(host: str, port: int, field: str) -> None:
    """ConfigError naming ``field`` when something listens on ``host:port`` already."""
    with socket.socket() as probe:
        # As a server binds it: a port left in TIME_WAIT by a stopped server counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            where = f"port {port}" if host == "0.0.0.0" else f"{host}:{port}"
            raise ConfigError(
                f"{field}: {where} is in use ({exc.strerror}); stop what holds it or choose "
                f"another port with {field}"
            ) from None


class _RayLogFile(logging.FileHandler):
    """The file Ray's output goes to (a class of its own, so that it is found again)."""


@contextmanager
def _ray_output_to(path: Path) -> Iterator[None]:
    """Ray's loggers, warnings and pushed messages to ``path`` for the block; then as before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RayLogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    saved = {name: list(logger.handlers) for name, logger in _ray_loggers().items()}
    show, print_pushed = warnings.showwarning, ray_worker.print_to_stdstream

    def show_warning(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if filename.startswith(RAY_PACKAGE):
            logging.getLogger("ray.warnings").warning("%s: %s", category.__name__, message)
        else:
            show(message, category, filename, lineno, *rest)

    def print_to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        for line in data.get("lines", []):
            logging.getLogger("ray.pushed").warning("(%s) %s", data.get("pid"), line)

    logging.getLogger("ray").addHandler(handler)
    _reroute_ray_loggers()
    warnings.showwarning = show_warning
    # Private, but the one way in: the driver's error thread calls this module function by name.
    ray_worker.print_to_stdstream = print_to_log
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = print_pushed
        warnings.showwarning = show
        for name, logger in _ray_loggers().items():
            logger.handlers = saved.get(name, [h for h in logger.handlers if h is not handler])
        handler.close()


def _ray_loggers() -> dict[str, logging.Logger]:
    return {
        name: logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and (name == "ray" or name.startswith("ray."))
    }


def _reroute_ray_loggers() -> None:
    """While Ray's output goes to a file, swap every console handler of its loggers for it."""
    log_file = [h for h in logging.getLogger("ray").handlers if isinstance(h, _RayLogFile)]
    if not log_file:
        return
    for logger in _ray_loggers().values():
        consoles = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        if consoles:
            kept = [h for h in logger.handlers if h not in consoles and h is not log_file[0]]
            logger.handlers = [*kept, log_file[0]]
