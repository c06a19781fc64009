"""``adapterswap serve``: start (or join) Ray, deploy the app, serve until stopped."""

from __future__ import annotations

import signal
import threading

from adapterswap.config import AdapterSwapConfig


def serve_until_stopped(
    config: AdapterSwapConfig,
    host: str,
    port: int,
    *,
    config_file: str | None,
    overrides: list[str],
) -> None:
    """Deploy the Serve application on ``host:port`` and block until SIGINT or SIGTERM.

    Joins the Ray cluster at ``ray.address`` (or RAY_ADDRESS), else starts a local one.
    On a signal, Serve drains in-flight requests before it shuts down.
    """
    import ray
    from ray import serve

    from actors.serve_app import build_app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal during start-up stops once it is up
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=config.ray.address, namespace=config.ray.namespace, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    args = {"home": config.home, "config": config.model_dump(), "num_replicas": 1}
    serve.run(build_app(args), name="adapterswap", route_prefix="/")
    print(f"AdapterSwap serving on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
