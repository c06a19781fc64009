"""Grafana dashboards for a served AdapterSwap, shipped with the package as JSON.

- ``serve.json``: Ray Serve's metrics for the application: request rate, errors, latency,
  healthy replicas, queues;
- ``adapterswap.json``: AdapterSwap's own (``actors/metrics.py``): routing, adapters per
  request, composition setup, the adapter bank's hit ratio.

Both read a Prometheus that scrapes Ray's metrics endpoints, chosen by a ``datasource``
variable; docs/operations.md says how to import them.
"""

from __future__ import annotations

from pathlib import Path

DASHBOARDS_DIR = Path(__file__).parent
