"""Shared helpers for the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "unknown"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"


def write_result(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    report = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_on_loopback(
    home: str, overrides: list[str], replicas: int, port: int | None = None
) -> str:
    """Deploy AdapterSwap on Ray Serve (Ray already initialised) on ``port`` of the loopback
    interface (default a free one), with ``replicas`` model replicas and ``overrides``
    (``--set`` strings) over the home's settings; returns its base URL."""
    from ray import serve

    from actors.serve_app import build_app
    from adapterswap.config import load_config

    config = load_config(home=home, overrides=overrides)
    port = port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"home": home, "config": config.model_dump(), "num_replicas": replicas}),
        name="adapterswap",
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"
