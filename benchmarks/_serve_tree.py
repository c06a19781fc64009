"""Serve one home with the AdapterSwap of a source tree, until stdin closes.

    PYTHONPATH=TREE python benchmarks/_serve_tree.py HOME PORT METRICS_PORT [--set S.F=V ...]

``serve_traffic.py`` runs this in a subprocess so that two versions of the code (this
checkout and an older commit checked out elsewhere) can serve the same home in one benchmark
run: ``PYTHONPATH`` names the tree whose ``adapterswap`` and ``actors`` are imported, here and
in every Ray worker the local cluster starts (they inherit the environment). Prints
``ready <path of the adapterswap package>`` once the app answers.
"""

from __future__ import annotations

import os
import sys

import ray
from _common import serve_on_loopback
from ray import serve

import adapterswap


def main() -> None:
    home, port, metrics_port, *rest = sys.argv[1:]
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=int(metrics_port),
    )
    try:
        serve_on_loopback(home, overrides, 1, port=int(port))
        print(f"ready {os.path.dirname(adapterswap.__file__)}", flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin (or exits)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
