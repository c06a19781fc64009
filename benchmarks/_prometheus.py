"""Reading Ray's Prometheus export: samples by series, what they counted between two
scrapes, and histogram quantiles as Prometheus' ``histogram_quantile`` computes them."""

from __future__ import annotations

import math
import re

import httpx2 as httpx

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?P<labels>\{.*\})? (?P<value>\S+)$")
_LE = re.compile(r'le="([^"]+)"')


def scrape(metrics_url: str, prefix: str = "ray_adapterswap_") -> dict[str, float]:
    """Every sample of the export whose name starts with ``prefix``, by its series."""
    return parse_samples(httpx.get(metrics_url, timeout=30).text, prefix)


def parse_samples(text: str, prefix: str) -> dict[str, float]:
    """The samples of a Prometheus text export whose name starts with ``prefix``, by their
    series (name and labels, as written)."""
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"].startswith(prefix):
            out[match["name"] + (match["labels"] or "")] = float(match["value"])
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each series counted between two scrapes (a series new since then, from zero)."""
    return {series: value - before.get(series, 0.0) for series, value in after.items()}


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for s, v in samples.items() if s == name or s.startswith(name + "{"))


def histogram(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets ``[(upper bound, count)]``, summed over its series."""
    buckets: dict[float, float] = {}
    for series, value in samples.items():
        if series.startswith(name + "_bucket{"):
            le = float(_LE.search(series)[1])
            buckets[le] = buckets.get(le, 0.0) + value
    return sorted(buckets.items())


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile, interpolated linearly within its bucket (as Prometheus'
    ``histogram_quantile``); the largest finite bound if it falls in the +Inf bucket."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def share_at_most(buckets: list[tuple[float, float]], bound: float) -> float:
    """The fraction of observations at most ``bound`` (one of the histogram's bounds)."""
    counts = dict(buckets)
    return counts[bound] / buckets[-1][1] if buckets and buckets[-1][1] else math.nan


# Labels Ray adds to every series (which process, session, exporter): not what a series means.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}
RAY_LABELS |= {"application", "deployment", "replica"}  # Serve's
RAY_LABELS |= {"otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def condense(samples: dict[str, float], prefix: str = "ray_adapterswap_") -> dict[str, float]:
    """The samples summed by what they mean: the name without ``prefix``, then the values of
    the labels Ray does not add (``adapter_tier_bytes{..., tier="host"}`` → ``host
    adapter_tier_bytes``)."""
    out: dict[str, float] = {}
    for series, value in samples.items():
        name, _, labels = series.partition("{")
        own = [v for k, v in _LABEL.findall(labels) if k not in RAY_LABELS]
        key = " ".join([*own, name.removeprefix(prefix)])
        out[key] = out.get(key, 0.0) + value
    return out
