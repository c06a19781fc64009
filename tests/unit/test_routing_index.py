"""The routing index: the same scores and decisions as the per-shard loop, only the caller's
groups read, incremental updates equal to a rebuild, revoked rows dropped at once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterswap.config import RouterSettings
from adapterswap.route.index import RoutingIndex, segment_scores
from adapterswap.route.router import Candidate, decide, route
from adapterswap.route.stats import KERNEL_BANDWIDTH, ShardStats, fit_shard_stats, score_shards
from adapterswap.types import AdapterRef, AdapterVersion

DIM = 24
GROUPS = ("eng", "fin", "hr")
# Loose enough that random directions route: the scores and decisions are what is compared.
SETTINGS = RouterSettings(min_score=-1.0, full_score=0.0, temperature=0.05, top_k=3)


def _version(adapter_id: str, group: str, version: int = 1) -> AdapterVersion:
    return AdapterVersion(adapter_id, version, adapter_id, group, "active", "/x", 1, "t", "t")


def _population(
    seed: int, per_group: int = 6
) -> dict[AdapterRef, tuple[AdapterVersion, ShardStats]]:
    """Shards of every group around a few shared directions, so scores come close."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, DIM))
    shards = {}
    for group in GROUPS:
        for i in range(per_group):
            n = int(rng.integers(1, 9))
            chunks = centres[rng.integers(0, 4)] + 0.7 * rng.normal(size=(n, DIM))
            version = _version(f"{group}.b.{i:03d}", group)
            shards[version.ref] = (version, fit_shard_stats(chunks, "e"))
    return shards


@pytest.fixture
def shards() -> dict[AdapterRef, tuple[AdapterVersion, ShardStats]]:
    return _population(0)


def _index(shards, refs=None) -> RoutingIndex:
    index = RoutingIndex(lambda ref: shards[ref][1])
    index.add(shards[r][0] for r in (refs if refs is not None else shards))
    return index


def _visible(shards, groups) -> list[AdapterVersion]:
    return sorted((v for v, _ in shards.values() if v.group in groups), key=lambda v: v.adapter_id)


def _queries(seed: int, n: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM))


@pytest.mark.parametrize("groups", [("hr",), ("eng", "hr"), GROUPS])
def test_scores_and_decisions_equal_the_per_shard_loop(shards, groups) -> None:
    index, visible = _index(shards), _visible(shards, groups)
    for query in _queries(1):
        versions, scores = index.score(query, visible)
        assert versions == visible
        old = score_shards(query, [shards[v.ref][1] for v in visible])
        np.testing.assert_allclose(scores, old, rtol=0, atol=1e-5)
        candidates = [Candidate(v, shards[v.ref][1]) for v in visible]
        for top_k in (None, 1, 0):
            new = decide(versions, scores, SETTINGS, top_k=top_k)
            was = route(query, candidates, SETTINGS, top_k=top_k)
            assert [a.ref for a in new.adapters] == [a.ref for a in was.adapters]
            assert [a.weight for a in new.adapters] == pytest.approx(
                [a.weight for a in was.adapters], abs=1e-4
            )
            assert (new.reason, new.candidates) == (was.reason, was.candidates)


def test_a_tie_is_broken_by_adapter_id_as_the_loop_does() -> None:
    same = fit_shard_stats(np.eye(DIM)[:2], "e")
    shards = {v.ref: (v, same) for v in (_version("hr.b", "hr"), _version("hr.a", "hr"))}
    visible = _visible(shards, ("hr",))
    versions, scores = _index(shards).score(np.eye(DIM)[0], visible)
    decision = decide(versions, scores, SETTINGS, top_k=1)
    assert scores[0] == scores[1] and [a.ref.id for a in decision.adapters] == ["hr.a"]


def test_segment_scores_are_stable_far_from_zero() -> None:
    z = np.array([1000.0, 1000.0, -1000.0, 0.0])
    out = segment_scores(z, np.array([0, 2]), np.array([2, 2]))
    expected = KERNEL_BANDWIDTH * np.array([1000.0, np.log((np.exp(-1000.0) + 1) / 2)])
    np.testing.assert_allclose(out, expected)


def test_a_caller_s_routing_ignores_every_other_group(shards) -> None:
    """Same scores and decisions whether or not other groups' shards exist, and other groups'
    rows poisoned change nothing: NaN rows, or rows of another dimension, which would raise
    if they were ever multiplied by the caller's query."""
    mine = {r: s for r, s in shards.items() if s[0].group == "hr"}

    def poison(rows):
        return {r: (v, s if v.group == "hr" else rows(s)) for r, (v, s) in shards.items()}

    nan = poison(lambda s: ShardStats(np.full_like(s.chunks, np.nan), "e"))
    wider = poison(lambda s: ShardStats(np.ones((s.n_chunks, DIM + 1)) / np.sqrt(DIM + 1), "e"))
    visible = _visible(shards, ("hr",))
    for query in _queries(2):
        alone = _index(mine).score(query, visible)
        for world in (shards, nan, wider):
            versions, scores = _index(world).score(query, visible)
            assert versions == alone[0]
            np.testing.assert_array_equal(scores, alone[1])
            assert decide(versions, scores, SETTINGS) == decide(*alone, SETTINGS)


@settings(max_examples=40, deadline=None)
@given(
    syncs=st.lists(
        st.tuples(st.lists(st.integers(0, 17), max_size=6), st.lists(st.integers(0, 17))),
        max_size=8,
    ),
    seed=st.integers(0, 3),
)
def test_incremental_updates_equal_a_rebuild(syncs, seed) -> None:
    """Syncs that add and remove versions (the active set's eviction hook, then requests
    reading the new ones) leave the index equal to a fresh one over the same set."""
    shards = _population(seed)
    refs = sorted(shards, key=lambda r: r.id)
    index = RoutingIndex(lambda ref: shards[ref][1])
    present: set[AdapterRef] = set()
    for added, removed in syncs:
        keep = (present - {refs[i] for i in removed}) | {refs[i] for i in added}
        assert set(index.retain(keep)) == present - keep
        index.add(shards[r][0] for r in keep)  # a request: reads only those not indexed
        present = keep
    fresh = _index(shards, present)
    visible = _visible(shards, GROUPS)
    for query in _queries(3, 4):
        got, want = index.score(query, visible), fresh.score(query, visible)
        assert got[0] == want[0] == [v for v in visible if v.ref in present]
        np.testing.assert_array_equal(got[1], want[1])


def test_a_version_dropped_while_its_stats_are_read_is_not_added(shards) -> None:
    """A revocation racing a first read: the read lands after ``retain`` dropped it."""
    target = _visible(shards, ("hr",))[0]
    index: RoutingIndex

    def read_then_revoked(ref: AdapterRef) -> ShardStats:
        index.retain({r for r in shards if r != target.ref})
        return shards[ref][1]

    index = RoutingIndex(read_then_revoked)
    index.add([target])
    assert index.score(_queries(4, 1)[0], [target]) == ([], pytest.approx(np.zeros(0)))


def test_a_query_of_another_dimension_is_refused(shards) -> None:
    with pytest.raises(ValueError, match=f"query: dim 5 does not match shard stats dim {DIM}"):
        _index(shards).score(np.ones(5), _visible(shards, ("hr",)))


def test_the_index_holds_one_copy_of_the_statistics() -> None:
    """After packing, a shard's rows live only in its group's matrix: the statistics as read
    are not kept beside it (at 5,000 shards a second copy was 123 MB of the ingress)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    versions = [_version(f"{GROUPS[i % 3]}.b.{i:03d}", GROUPS[i % 3]) for i in range(120)]

    def read(ref: AdapterRef) -> ShardStats:  # fresh arrays, as read from storage
        return fit_shard_stats(rng.normal(size=(16, 256)), "e")

    tracemalloc.start()
    try:
        index = RoutingIndex(read)
        index.add(versions)
        index.score(rng.normal(size=256), versions)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rows = 120 * 16 * 256 * 4  # the float32 rows, once
    assert rows <= held < 1.3 * rows
