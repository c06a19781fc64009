"""The catalog works against a real S3-protocol server (moto) with the same code as local paths."""

from __future__ import annotations

import json

import pytest

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_files
from adapterswap.config import load_config
from adapterswap.errors import InvalidDocument


@pytest.fixture
def storage_uri(s3_query):
    return f"s3://bucket/org/prod?{s3_query}"


def test_ingest_and_read_back_over_s3(tmp_path, storage_uri):
    config = load_config(home=str(tmp_path / "h"), overrides=["sharding.strategy=sequential"])
    config = config.model_copy(update={"storage_uri": storage_uri})
    docs = tmp_path / "d.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "text": f"fact {i}", "group": "ops"}) + "\n"
            for i in range(4)
        )
    )
    result = ingest_files([docs], config, embed=None)
    assert result.accepted == 4

    catalog = Catalog(storage_uri)
    assert not catalog.location.is_local
    assert catalog.ids() == {"s0", "s1", "s2", "s3"}
    assert [f.rsplit("/", 1)[0] for f in catalog.fragments()] == ["bucket/org/prod/catalog"]
    assert catalog.shard_summaries()[0].doc_count == 4

    # A rejected ingest leaves the bucket exactly as it was.
    before = catalog.fragments()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "s0", "text": "again", "group": "ops"}) + "\n")
    with pytest.raises(InvalidDocument, match="already exists in the catalog"):
        ingest_files([bad], config, embed=None)
    assert catalog.fragments() == before
