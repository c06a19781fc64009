"""benchmarks/serve_traffic.py's traffic and statistics, which its published numbers rest on:
the arrivals are the open-loop Poisson process it claims, the request mix is the issue's, and
the latencies are computed from the right timestamps."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_traffic import Outcome, summarise, traffic  # noqa: E402


def test_arrivals_are_poisson_at_the_rate_and_the_mix_is_the_one_described():
    requests = traffic(2000, 4.0, seed=3)
    assert requests == traffic(2000, 4.0, seed=3)  # the same requests for both servers
    gaps = [b.at - a.at for a, b in zip(requests, requests[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.08)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: sd = mean
    bodies = [r.body for r in requests]
    assert {b["max_tokens"] for b in bodies} == set(range(8, 129))
    assert all(b["ignore_eos"] and b["temperature"] == 0 for b in bodies)
    streamed = [b for b in bodies if b["stream"]]
    assert 0.45 < len(streamed) / len(bodies) < 0.55
    assert all(b["stream_options"] == {"include_usage": True} for b in streamed)
    assert all("stream_options" not in b for b in bodies if not b["stream"])
    words = [len(b["prompt"].split(" ")) for b in bodies]
    assert min(words) == 6 and 200 < max(words) <= 240
    base = sum(b["adapters"] == "none" for b in bodies) / len(bodies)
    assert 0.08 < base < 0.14  # one caller in nine
    mixtures = {tuple(a["id"] for a in b["adapters"]) for b in bodies if b["adapters"] != "none"}
    assert len(mixtures) == 8 and all(len(m) == 3 for m in mixtures)


def test_a_burst_arrives_at_once_and_callers_can_be_one_kind():
    assert {r.at for r in traffic(20, math.inf, seed=0)} == {0.0}
    assert {str(r.body["adapters"]) for r in traffic(50, math.inf, 1, "base")} == {"none"}
    assert all(r.body["adapters"] != "none" for r in traffic(50, math.inf, 1, "mixtures"))


def test_latencies_come_from_the_send_first_chunk_and_done_times():
    outcomes = [
        Outcome(stream=True, sent=0.0, done=2.0, status=200, tokens=4, chunks=[0.5, 1.0, 1.5, 2.0]),
        Outcome(stream=True, sent=1.0, done=4.0, status=200, tokens=3, chunks=[2.0, 3.0, 4.0]),
        Outcome(stream=False, sent=2.0, done=6.0, status=200, tokens=10),
        Outcome(stream=False, sent=3.0, done=3.1, status=503),
    ]
    summary = summarise(outcomes, offered=1.0)
    assert summary["errors"] == 1 and summary["seconds"] == 6.0
    assert summary["completion_tokens_per_s"] == pytest.approx(17 / 6)
    assert summary["requests_per_s"] == pytest.approx(3 / 6)
    assert summary["ttft_s"] == {"p50": 1.0, "p99": 1.0, "n": 2}  # streams only
    assert summary["itl_s"]["n"] == 5 and summary["itl_s"]["p99"] == 1.0
    assert summary["e2e_s"] == {"p50": 3.0, "p99": 4.0, "n": 3}  # the 503 is not a latency


def test_base_only_and_mixtures_only_traffic_differ_only_in_their_adapters():
    base, mixed = traffic(40, 2.0, 5, "base"), traffic(40, 2.0, 5, "mixtures")
    for a, b in zip(base, mixed, strict=True):
        assert a.at == b.at
        assert {**a.body, "adapters": None} == {**b.body, "adapters": None}
