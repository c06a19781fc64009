"""What an operator looks at, on a served app: every metric the shipped dashboards query is on
Ray's metrics endpoint, and the API docs page loads through Serve's proxy."""

from __future__ import annotations

import re
import time
import urllib.request
from collections import defaultdict
from typing import Any

import httpx2 as httpx
import pytest
from dashboard_queries import dashboard_metrics
from ray import serve
from support import metrics_export, publish_random_adapter

from adapterswap.models.embedder import load_embedder
from adapterswap.store.registry import AdapterRegistry

METRICS_URL: list[str] = []  # Ray's Prometheus endpoint of the module's cluster
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s")


@pytest.fixture(scope="module")
def ray_init_options() -> dict[str, Any]:
    """The module's cluster exports Ray's metrics on a known port, every 0.5 s."""
    options, url = metrics_export()
    METRICS_URL.append(url)
    return options


@pytest.fixture(scope="module")
def served(tiny_config, serve_app) -> tuple[httpx.Client, str]:
    """The app with one adapter, and a key that routes to it: ``(client, key)``."""
    config = tiny_config(serve={"max_new_tokens": 4})
    registry = AdapterRegistry(config.db_path)
    embed = load_embedder(config.embedding).embed
    publish_random_adapter(
        config, registry, embed, "hr.b0001.000", "hr", ["New parents get 23 weeks of leave."], 1
    )
    key = registry.create_key("hana", ["hr"])[0]
    port = serve_app(config)
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120), key


def scrape() -> dict[str, list[str]]:
    """Each sample name on the endpoint, with the label sets it has."""
    with urllib.request.urlopen(METRICS_URL[-1], timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1)].append(match.group(2) or "")
    return samples


def test_every_metric_the_dashboards_query_is_exported_for_the_app(served):
    client, key = served
    auth = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "How long is parental leave?", "max_tokens": 2, "temperature": 0}
    for _ in range(2):  # the adapter's first use loads it (a miss), the second is a hit
        reply = client.post("/v1/completions", json=body, headers=auth)
        assert reply.status_code == 200, reply.text
    assert client.get("/v1/models").status_code == 401  # an HTTP error
    with pytest.raises(Exception, match="malformed API key"):  # raised in the ingress replica
        serve.get_app_handle("adapterswap").completions.remote("wrong", body).result()

    # Every panel filters on application="$application": the app's samples must carry it.
    wanted = dashboard_metrics()
    deadline = time.monotonic() + 60
    while True:
        samples = scrape()
        missing = [
            name
            for name in wanted
            if not any('application="adapterswap"' in labels for labels in samples.get(name, []))
        ]
        if not missing:
            break
        assert time.monotonic() < deadline, (missing, sorted(samples))
        time.sleep(1)


def test_the_docs_page_loads_through_serve_without_a_key(served):
    client, _ = served
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(url.startswith("/docs/assets/") for url in assets), assets
    assert all(client.get(url).status_code == 200 for url in assets)
