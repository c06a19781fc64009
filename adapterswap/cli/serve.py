"""``adapterswap serve``: the HTTP API on Ray Serve until SIGINT or SIGTERM.

Ray and Serve are started (or joined) by ``actors.serve_run``; this module only reads the
command's flags.
"""

from __future__ import annotations

import argparse
from typing import Any

from actors.serve_run import serve_until_stopped
from adapterswap.config import AdapterSwapConfig


def serve_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """Serve on ``--host``/``--port`` (default: the config's ``serve`` section) until stopped."""
    host = args.host or config.serve.host
    port = args.port or config.serve.port
    serve_until_stopped(config, host, port)
    return "stopped", {"stopped": True}
