"""Shard planning: group purity, stability across batches, bounds, determinism, topicality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.documents import Document, content_hash
from adapterswap.catalog.ingest import ingest_files
from adapterswap.catalog.planner import plan_shards, split_sequential
from adapterswap.config import ShardingSettings, load_config

TOPICS = {
    "payroll": "Payroll note {i}: salaries are paid on the {i}th, overtime is approved by managers, "
    "and payslips list tax withholding and pension contributions.",
    "firmware": "Firmware note {i}: the sensor bootloader verifies image signatures, flashes "
    "partition {i}, and rolls back when the watchdog trips after an update.",
    "sailing": "Sailing note {i}: the regatta starts at buoy {i}, boats tack upwind against "
    "the tide, and the spinnaker goes up on the downwind leg.",
}


def make_doc(doc_id: str, text: str, group: str = "eng", batch: str | None = None) -> Document:
    return Document(doc_id, text, group, batch, "{}", content_hash(text), doc_id)


def interleaved(n_per_topic: int, group: str = "eng") -> list[Document]:
    docs = []
    for i in range(n_per_topic):
        for topic, template in TOPICS.items():
            docs.append(make_doc(f"{topic}-{group}{i}", template.format(i=i + 1), group))
    return docs


def settings(**kw) -> ShardingSettings:
    return ShardingSettings(**{"max_shard_tokens": 64 * 6, **kw})


def test_topical_shards_follow_topics(embed):
    docs = interleaved(5)  # 15 docs, three topics, arriving interleaved
    tokens = sum(d.tokens for d in docs)
    plans = plan_shards(
        docs,
        batch="b0001",
        existing_shards=[],
        settings=settings(max_shard_tokens=tokens // 3 + 40),
        embed=embed,
    )
    assert len(plans) == 3
    for plan in plans:
        topics = {doc_id.split("-")[0] for doc_id in plan.doc_ids}
        assert len(topics) == 1, plan.doc_ids
    # Arrival order, by contrast, mixes all three topics in every shard.
    for shard in split_sequential(docs, settings(max_shard_tokens=tokens // 3 + 40)):
        assert len({docs[i].id.split("-")[0] for i in shard}) == 3


def test_bounds_hold_and_every_doc_placed_once(embed):
    docs = interleaved(8)
    s = settings(max_shard_tokens=200, max_shard_docs=5)
    for strategy in ("topical", "sequential"):
        plans = plan_shards(
            docs,
            batch="b1",
            existing_shards=[],
            settings=s.model_copy(update={"strategy": strategy}),
            embed=embed,
        )
        placed = [d for p in plans for d in p.doc_ids]
        assert sorted(placed) == sorted(d.id for d in docs)
        for plan in plans:
            assert plan.tokens <= 200 and len(plan.doc_ids) <= 5


def test_shards_never_mix_groups(embed):
    docs = interleaved(3, "hr") + interleaved(3, "finance") + [make_doc("x", "lone doc", "ops")]
    plans = plan_shards(
        docs, batch="b1", existing_shards=[], settings=settings(max_shard_tokens=150), embed=embed
    )
    group_of = {d.id: d.group for d in docs}
    for plan in plans:
        assert {group_of[d] for d in plan.doc_ids} == {plan.group}
        assert plan.shard.startswith(f"{plan.group}.b1.")
    assert {p.group for p in plans} == {"hr", "finance", "ops"}


def test_deterministic_for_a_seed(embed):
    docs = interleaved(6)
    s = settings(max_shard_tokens=180)
    a = plan_shards(docs, batch="b1", existing_shards=[], settings=s, embed=embed)
    b = plan_shards(docs, batch="b1", existing_shards=[], settings=s, embed=embed)
    assert a == b


def test_new_shard_ids_continue_after_existing():
    docs = [make_doc("a", "alpha"), make_doc("b", "beta", batch="b7")]
    plans = plan_shards(
        docs,
        batch="b1",
        existing_shards=["eng.b1.000", "eng.b1.001", "hr.b1.004"],
        settings=settings(strategy="sequential"),
    )
    assert [p.shard for p in plans] == ["eng.b1.002", "eng.b7.000"]


def test_topical_needs_an_embedder():
    with pytest.raises(ValueError, match="topical strategy needs an embedder"):
        plan_shards(
            interleaved(10), batch="b", existing_shards=[], settings=settings(max_shard_tokens=100)
        )


def _write(path: Path, docs: list[Document]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": d.id, "text": d.text, "group": d.group}) + "\n" for d in docs)
    )
    return path


def test_second_batch_never_moves_placed_documents(tmp_path, embed):
    config = load_config(home=str(tmp_path / "h"), overrides=["sharding.max_shard_tokens=200"])
    first = ingest_files(
        [_write(tmp_path / "1.jsonl", interleaved(4, "hr") + interleaved(2, "eng"))],
        config,
        embed=embed,
    )
    catalog = Catalog(config.storage)
    placed = catalog.placements()
    assert len(first.shards) >= 3

    batch2 = [
        make_doc(f"n{i}", d.text + " Revised.", d.group) for i, d in enumerate(interleaved(3, "hr"))
    ]
    second = ingest_files([_write(tmp_path / "2.jsonl", batch2)], config, embed=embed)
    after = catalog.placements()
    assert {d: after[d] for d in placed} == placed  # nothing moved
    old_shards = set(placed.values())
    new_shards = {p.shard for p in second.shards}
    assert not old_shards & new_shards  # a new batch goes into new shards
    assert all(s.startswith("hr.b0002.") for s in new_shards)
    assert second.batch == "b0002" and first.batch == "b0001"
    # Planning again over the catalog's own batches changes nothing either.
    summaries = {s.shard: s.doc_count for s in catalog.shard_summaries()}
    assert sum(summaries.values()) == len(after)
