"""The metric names the shipped Grafana dashboards query, read with a real PromQL parser.

Shared by tests/unit/test_dashboards.py (the names against what the code registers) and
tests/ray/test_serve.py (the names against a live metrics endpoint).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser

from adapterswap.ops.dashboards import DASHBOARDS_DIR

# Grafana's own interval variables stand for a duration; every other variable for a value.
_INTERVAL = re.compile(r"\$__(rate_interval|interval|range)\b")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*\w+\)$")


def dashboards() -> dict[str, dict[str, Any]]:
    """Every shipped dashboard, by file name."""
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS_DIR.glob("*.json")}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the board: panel targets and template variables' queries."""
    exprs = [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metrics ``expr`` selects; ValueError if it is not PromQL or selects by regex only."""
    label_values = _LABEL_VALUES.match(expr)
    if label_values:
        return {label_values.group(1)}
    plain = _VARIABLE.sub("x", _INTERVAL.sub("5m", expr))
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                raise ValueError(f"{expr}: a selector without a metric name")
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(plain), visit)
    return names


def dashboard_metrics() -> dict[str, set[str]]:
    """Every metric name the dashboards use, with the dashboards that use it."""
    used: dict[str, set[str]] = {}
    for name, board in dashboards().items():
        for expr in queries(board):
            for metric in metric_names(expr):
                used.setdefault(metric, set()).add(name)
    return used
