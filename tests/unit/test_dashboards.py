"""The shipped Grafana dashboards import into Grafana and query only metrics the code exports.

The names are checked here against what ``actors/metrics.py`` registers and the Serve metrics
Ray's own dashboards query; tests/ray/test_serve.py checks them on a live endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from dashboard_queries import dashboard_metrics, dashboards, metric_names, panels, queries
from ray.dashboard.modules.metrics.dashboards.serve_dashboard_panels import (
    serve_dashboard_config,
)
from ray.dashboard.modules.metrics.dashboards.serve_deployment_dashboard_panels import (
    serve_deployment_dashboard_config,
)
from ray.util.metrics import Counter, Gauge, Histogram, Metric

from actors.metrics import ServeMetrics

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
BOARDS = dashboards()


def datasources(node: Any) -> Iterator[Any]:
    """Every ``datasource`` value anywhere in a dashboard's JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasources(item)


def exported_names(metric: Metric) -> set[str]:
    """The sample names a metric has on Ray's Prometheus endpoint (Ray adds ``ray_``)."""
    name = f"ray_{metric.info['name']}"
    if isinstance(metric, Counter):
        return {f"{name}_total"}
    if isinstance(metric, Histogram):
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert isinstance(metric, Gauge), metric
    return {name}


def test_both_dashboards_ship_with_the_package():
    assert sorted(BOARDS) == ["adapterswap.json", "serve.json"]
    assert len({board["uid"] for board in BOARDS.values()}) == len(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_a_dashboard_is_grafana_json_that_asks_for_its_prometheus(name):
    board = BOARDS[name]
    assert board["title"] and re.fullmatch(r"[\w-]{1,40}", board["uid"])
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # No data source uid of the machine it was made on: every query uses the variable.
    assert all(source == DATASOURCE for source in datasources(board))
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE and panel["title"] and panel["description"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(target["expr"] for target in panel["targets"]), panel["title"]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_query_is_promql_over_named_metrics(name):
    for expr in queries(BOARDS[name]):
        assert metric_names(expr), expr


def test_a_query_that_is_not_promql_or_selects_by_regex_is_refused():
    with pytest.raises(ValueError):
        metric_names("sum(rate(ray_serve_num_http_requests_total[$__rate_interval])")
    with pytest.raises(ValueError, match="without a metric name"):
        metric_names('sum(rate({__name__=~"ray_serve_.*"}[5m]))')


def test_the_adapterswap_panels_show_every_metric_the_code_registers_and_no_other():
    held = vars(ServeMetrics()).values()
    values = [v for value in held for v in (value.values() if isinstance(value, dict) else [value])]
    metrics = [value for value in values if isinstance(value, Metric)]
    assert len(metrics) == 19  # the tier counters sit in a dict
    exported = set().union(*(exported_names(metric) for metric in metrics))
    used = {name for name in dashboard_metrics() if name.startswith("ray_adapterswap_")}
    assert used <= exported, used - exported
    for metric in metrics:  # a metric added to actors/metrics.py gets a panel
        assert exported_names(metric) & used, metric.info["name"]


def test_the_serve_panels_query_metrics_ray_serve_exports():
    """Ray's own Serve dashboards (of the installed Ray) name what Serve exports."""
    ray_queries = [
        target.expr
        for config in (serve_dashboard_config, serve_deployment_dashboard_config)
        for panel in [*config.panels, *(p for row in config.rows for p in row.panels)]
        for target in panel.targets
    ]
    known = set(re.findall(r"ray_serve_\w+", " ".join(ray_queries)))
    used = {name for name in dashboard_metrics() if name.startswith("ray_serve_")}
    assert len(used) >= 8 and used <= known, used - known
    assert {name.split("_", 1)[0] for name in dashboard_metrics()} == {"ray"}
