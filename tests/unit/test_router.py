"""Routing: only visible candidates, sharp weights, a cut for weak ones, none when irrelevant."""

from __future__ import annotations

import numpy as np
import pytest

from adapterswap.config import RouterSettings
from adapterswap.route.router import Candidate, route, routing_texts
from adapterswap.route.stats import compute_shard_stats, fit_shard_stats
from adapterswap.types import AdapterVersion

SHARDS = {
    ("hr", "hr.b1.000"): [
        "New parents receive 23 weeks of fully paid parental leave.",
        "Parental leave can be split into three blocks during the first year.",
        "The dental and vision plan covers employees and their children.",
        "The pension scheme matches contributions up to six percent of salary.",
    ],
    ("engineering", "engineering.b1.000"): [
        "The firmware bootloader verifies the image signature before flashing.",
        "Firmware version 7 adds a watchdog that rolls back failed updates.",
        "The sensor firmware samples salinity every ninety seconds.",
        "Over-the-air firmware updates are staged to ten percent of buoys first.",
    ],
    ("finance", "finance.b1.000"): [
        "Vendor invoices are paid thirty-seven days after receipt.",
        "Expense claims need a receipt for anything above forty crowns.",
        "The purchase approval panel meets every Thursday to review orders.",
        "Travel meals are reimbursed up to a daily allowance.",
    ],
}


@pytest.fixture(scope="module")
def candidates(embed):
    out = []
    for (group, shard), texts in SHARDS.items():
        version = AdapterVersion(shard, 1, shard, group, "active", "/x", len(texts), "t", "t")
        out.append(
            Candidate(version, compute_shard_stats(texts, embed, "embedded:all-MiniLM-L6-v2"))
        )
    return out


def ask(embed, text):
    return embed([text])[0]


def test_relevant_query_gets_its_shard_with_a_sharp_weight(embed, candidates):
    decision = route(
        ask(embed, "How many weeks of parental leave do new parents get?"),
        candidates,
        RouterSettings(),
    )
    assert decision.reason == "routed"
    assert decision.adapters[0].ref.id == "hr.b1.000"
    assert decision.adapters[0].weight >= 0.8
    assert sum(a.weight for a in decision.adapters) == pytest.approx(1.0)
    assert all(a.weight >= RouterSettings().min_weight for a in decision.adapters)


def test_only_visible_candidates_are_ever_chosen(embed, candidates):
    finance_only = [c for c in candidates if c.version.group == "finance"]
    decision = route(
        ask(embed, "How many weeks of parental leave do new parents get?"),
        finance_only,
        RouterSettings(min_score=-1),
    )
    assert {a.group for a in decision.adapters} <= {"finance"}
    assert route(ask(embed, "firmware"), [], RouterSettings()).adapters == ()


def test_irrelevant_query_uses_no_adapter(embed, candidates):
    decision = route(ask(embed, "What is the capital of France?"), candidates, RouterSettings())
    assert decision.adapters == () and decision.reason == "nothing relevant"
    assert decision.best_similarity < RouterSettings().min_score


def test_top_k_bounds_and_zero(embed, candidates):
    query = ask(embed, "Who approves purchases and how fast are vendor invoices paid?")
    assert route(query, candidates, RouterSettings(), top_k=0).adapters == ()
    one = route(query, candidates, RouterSettings(), top_k=1).adapters
    assert (
        len(one) == 1 and one[0].weight == pytest.approx(1.0) and one[0].ref.id == "finance.b1.000"
    )
    flat = route(
        query, candidates, RouterSettings(temperature=50.0, min_weight=0.0), top_k=3
    ).adapters
    assert len(flat) == 3  # a high temperature spreads weight; the default keeps it sharp


def test_weak_candidates_are_cut(embed, candidates):
    query = ask(embed, "When does the firmware watchdog roll back an update?")
    loose = route(query, candidates, RouterSettings(temperature=0.5, min_weight=0.0))
    strict = route(query, candidates, RouterSettings(temperature=0.5, min_weight=0.34))
    assert len(strict.adapters) < len(loose.adapters)
    assert strict.adapters[0].ref.id == "engineering.b1.000"
    assert np.isclose(sum(a.weight for a in strict.adapters), 1.0)


def test_routing_texts_put_the_last_user_turn_first():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about parental leave."},
        {"role": "assistant", "content": "It lasts 23 weeks."},
        {"role": "user", "content": "And can it be split?"},
    ]
    texts = routing_texts(messages)
    assert texts[0] == "And can it be split?"
    assert "Tell me about parental leave." in texts[1] and "Be brief." not in texts[1]
    assert routing_texts([{"role": "user", "content": "hi"}]) == ["hi"]


@pytest.mark.parametrize("best", [0.1, 0.25, 0.3, 0.35, 0.5, 0.9])
def test_coverage_gate_hands_the_rest_to_the_base_model(best):
    """Weights scale linearly from 0 at min_score to 1 at full_score; below it, no adapter."""
    one = np.ones((1, 4)) / 2.0
    version = AdapterVersion("hr.b1.000", 1, "hr.b1.000", "hr", "active", "/x", 1, "t", "t")
    candidate = Candidate(version, fit_shard_stats(one, "e"))
    angle = np.arccos(best)  # a query whose cosine to the shard's only chunk is ``best``
    query = np.cos(angle) * one[0] + np.sin(angle) * np.array([0.5, -0.5, 0.5, -0.5])
    decision = route(query, [candidate], RouterSettings(min_score=0.25, full_score=0.35))
    assert decision.best_similarity == pytest.approx(best)
    expected = min(1.0, max(0.0, (best - 0.25) / 0.1))
    assert decision.coverage == pytest.approx(expected)
    assert sum(a.weight for a in decision.adapters) == pytest.approx(expected)
    assert (decision.adapters == ()) == (expected == 0.0)
    assert decision.as_dict()["coverage"] == pytest.approx(expected)


def test_coverage_gate_reads_only_the_visible_shards(embed, candidates):
    """The gate opens on the best *visible* shard: an invisible one that covers the query
    cannot lend its score, so a caller's composition says nothing of other groups' data."""
    query = ask(embed, "How many weeks of parental leave do new parents get?")
    settings = RouterSettings(min_score=0.2, full_score=0.9)
    everyone = route(query, candidates, settings)
    finance_only = route(query, [c for c in candidates if c.version.group == "finance"], settings)
    assert everyone.coverage > finance_only.coverage
    ramp = (finance_only.best_similarity - 0.2) / (0.9 - 0.2)
    assert finance_only.coverage == pytest.approx(min(1.0, max(0.0, ramp)))
    assert {a.group for a in finance_only.adapters} <= {"finance"}


def test_gate_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="full_score"):
        RouterSettings(min_score=0.5, full_score=0.4)
