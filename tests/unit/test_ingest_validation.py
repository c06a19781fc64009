"""Every validation failure names the problem, and leaves the catalog exactly as it was."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_files, ingest_lock, ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import load_config
from adapterswap.delete.job import request_delete
from adapterswap.errors import InvalidDocument
from adapterswap.store.records import DeletionState
from adapterswap.store.registry import AdapterRegistry


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def doc(i: int, group: str = "hr", **extra) -> dict:
    return {
        "id": f"d{i}",
        "text": f"Document {i} says the code word is word{i}.",
        "group": group,
        **extra,
    }


@pytest.fixture
def config(tmp_path):
    return load_config(home=str(tmp_path / "home"), overrides=["sharding.strategy=sequential"])


@pytest.fixture
def seeded(config, tmp_path):
    """A catalog that already holds one accepted batch."""
    ingest_files([write_jsonl(tmp_path / "seed.jsonl", [doc(0), doc(1)])], config, embed=None)
    return Catalog(config.storage)


def snapshot(catalog: Catalog) -> tuple[list[str], pa.Table]:
    return catalog.fragments(), catalog.read()


BAD_RECORDS = [
    ({"text": "x", "group": "hr"}, "missing field 'id'"),
    ({"id": "a", "group": "hr"}, "missing field 'text'"),
    ({"id": "a", "text": "hello"}, "missing field 'group'"),
    ({"id": "", "text": "hello", "group": "hr"}, "field 'id' is empty"),
    ({"id": "a", "text": "   ", "group": "hr"}, "field 'text' is empty"),
    ({"id": "a", "text": "hi", "group": "HR"}, r"field 'group': 'HR' is not a valid group name"),
    ({"id": "a", "text": "hi", "group": "-x"}, "is not a valid group name"),
    ({"id": "a", "text": "hi", "group": "a" * 65}, "is not a valid group name"),
    ({"id": "a", "text": "hi", "group": 7}, "field 'group' must be a string, got int"),
    ({"id": 5, "text": "hi", "group": "hr"}, "field 'id' must be a string, got int"),
    ({"id": "a/b", "text": "hi", "group": "hr"}, "field 'id': 'a/b' has characters outside"),
    ({"id": "a", "text": "hi", "group": "hr", "colour": 1}, "unknown field"),
    (
        {"id": "a", "text": "hi", "group": "hr", "metadata": [1]},
        "field 'metadata' must be a JSON object",
    ),
    ({"id": "a", "text": "hi", "group": "hr", "batch": "B 2"}, "not a valid batch name"),
    ({"id": "d1", "text": "hi", "group": "hr"}, "id 'd1' already exists in the catalog"),
    ({"id": "a", "text": "x" * 100_001, "group": "hr"}, "over ingest.max_doc_chars=100000"),
    ({"id": "a", "text": "\ud800 lone", "group": "hr"}, "cannot be encoded as UTF-8"),
    (
        {"id": "a", "text": "hi", "group": "hr", "metadata": {"note": "\ud800"}},
        "field 'metadata' contains characters that cannot be encoded as UTF-8",
    ),
    (
        {"id": "a", "text": "hi", "group": "hr", "metadata": {"\udfff": 1}},
        "field 'metadata' contains characters that cannot be encoded as UTF-8",
    ),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_bad_record_rejects_whole_input(config, seeded, tmp_path, record, message):
    before = snapshot(seeded)
    good = [doc(10), doc(11)]
    path = write_jsonl(tmp_path / "in.jsonl", [*good, record])
    with pytest.raises(InvalidDocument, match=message) as info:
        ingest_files([path], config, embed=None)
    assert any(p.startswith(f"{path}:3: ") for p in info.value.problems), info.value.problems
    assert snapshot(seeded) == before
    assert not {"d10", "d11"} & seeded.ids()


def test_oversized_for_a_shard(config, seeded, tmp_path):
    small = config.model_copy(
        update={"sharding": config.sharding.model_copy(update={"max_shard_tokens": 64})}
    )
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "big", "text": "word " * 100, "group": "hr"}])
    with pytest.raises(
        InvalidDocument,
        match=r"in.jsonl:1: field 'text' is ~125 tokens, over sharding.max_shard_tokens=64",
    ):
        ingest_files([path], small, embed=None)


def test_duplicate_ids_within_input_name_both_lines(config, seeded, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [doc(5), doc(6), doc(5)])
    with pytest.raises(
        InvalidDocument, match=rf"{path}:3: duplicate id 'd5', first seen at {path}:1"
    ):
        ingest_files([path], config, embed=None)
    assert "d5" not in seeded.ids()


def test_duplicate_across_files(config, seeded, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [doc(7)])
    b = write_jsonl(tmp_path / "b.jsonl", [doc(7)])
    with pytest.raises(
        InvalidDocument, match="b.jsonl:1: duplicate id 'd7', first seen at .*a.jsonl:1"
    ):
        ingest_files([a, b], config, embed=None)


def test_undecodable_jsonl_line(config, seeded, tmp_path):
    before = snapshot(seeded)
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        json.dumps(doc(8)).encode() + b"\n" + b'{"id": "x", "text": "caf\xe9", "group": "hr"}\n'
    )
    with pytest.raises(InvalidDocument, match=r"in.jsonl:2: text is not valid UTF-8 \(byte 0xe9"):
        ingest_files([path], config, embed=None)
    assert snapshot(seeded) == before


def test_invalid_json_line(config, seeded, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(doc(8)) + "\n{not json\n[1, 2]\n")
    with pytest.raises(InvalidDocument) as info:
        ingest_files([path], config, embed=None)
    assert info.value.problems[0].startswith(f"{path}:2: not valid JSON")
    assert info.value.problems[1] == f"{path}:3: expected a JSON object, got list"


def test_empty_input(config, seeded, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InvalidDocument, match="no documents in the input"):
        ingest_files([path], config, embed=None)


def test_unsupported_and_missing_files(config, seeded, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InvalidDocument) as info:
        ingest_files([txt, tmp_path / "nope.jsonl"], config, embed=None)
    assert "unsupported file type '.txt'" in info.value.problems[0]
    assert "nope.jsonl: cannot read file" in info.value.problems[1]


def test_csv_line_numbers_and_undecodable(config, seeded, tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('id,text,group\nc1,"hello there",hr\nc2,,hr\n')
    with pytest.raises(InvalidDocument, match=r"in.csv:3: missing field 'text'"):
        ingest_files([path], config, embed=None)
    path.write_bytes(b"id,text,group\nc1,fine,hr\nc2,caf\xe9,hr\n")
    with pytest.raises(InvalidDocument, match=r"in.csv:3: text is not valid UTF-8"):
        ingest_files([path], config, embed=None)


def test_parquet_record_numbers_and_undecodable(config, seeded, tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"id": ["p1", "p2"], "text": ["ok", "also ok"], "group": ["hr", "Bad"]}), path
    )
    with pytest.raises(InvalidDocument, match=r"in.parquet:record 2: field 'group': 'Bad'"):
        ingest_files([path], config, embed=None)
    raw = pa.table(
        {
            "id": ["p1", "p2"],
            "text": pa.array([b"ok", b"\xff\xfe"], pa.binary()),
            "group": ["hr", "hr"],
        }
    )
    pq.write_table(raw, path)
    with pytest.raises(
        InvalidDocument, match=r"in.parquet:record 2: field 'text': text is not valid UTF-8"
    ):
        ingest_files([path], config, embed=None)


def test_group_flag_conflict_and_default(config, seeded, tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "g1", "text": "hello"}, doc(9, group="finance")]
    )
    with pytest.raises(
        InvalidDocument, match=r"in.jsonl:2: field 'group' is 'finance' but --group says 'hr'"
    ):
        ingest_files([path], config, embed=None, group="hr")


def test_all_three_formats_ingest(config, tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [doc(1, metadata={"title": "one"})])
    csv_path = tmp_path / "b.csv"
    csv_path.write_text('id,text,group,metadata\nd2,"Doc two, with a comma",finance,"{""k"": 1}"\n')
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["d3"], "text": ["Doc three"], "group": ["hr"]}), parquet)
    result = ingest_files([jsonl, csv_path, parquet], config, embed=None)
    assert result.accepted == 3
    rows = {r["id"]: r for r in Catalog(config.storage).read().to_pylist()}
    assert rows["d2"]["text"] == "Doc two, with a comma"
    assert json.loads(rows["d2"]["metadata"]) == {"k": 1}
    assert json.loads(rows["d1"]["metadata"]) == {"title": "one"}
    assert rows["d3"]["content_hash"].startswith("sha256:")
    assert {r["batch"] for r in rows.values()} == {"b0001"}
    assert rows["d2"]["shard"].startswith("finance.b0001.")
    assert rows["d1"]["ingested_at"] is not None


# -- ingest while deletions are unfinished, replace, and the critical section ---------------


@pytest.fixture
def store(config):
    registry = AdapterRegistry(config.db_path)
    yield registry
    registry.close()


def hash_of(config, doc_id: str) -> str:
    rows = Catalog(config.storage).read(["id", "content_hash"]).to_pylist()
    return next(r["content_hash"] for r in rows if r["id"] == doc_id)


def replacer(config, store):
    """What the gateway does for ``replace: true`` (under the ingest lock): revoke, remove the
    old rows, record them removed."""
    calls = []

    def replace(doc_ids):
        catalog = Catalog(config.storage)
        request = request_delete(store, catalog, doc_ids, "test", "test")
        catalog.remove(doc_ids, {d: request.held.get(d, []) for d in doc_ids})
        done = [r for r in request.records if r.content_hash in request.held.get(r.doc_id, [])]
        store.advance_deletion(done, DeletionState.REMOVED)
        calls.append(doc_ids)

    return replace, calls


def test_an_id_being_deleted_is_refused_until_its_deletion_is_purged(config, store, tmp_path):
    seed = write_jsonl(tmp_path / "seed.jsonl", [doc(0), doc(1)])
    ingest_files([seed], config, embed=None, audit=store)
    request = request_delete(store, Catalog(config.storage), ["d1"], "test", "test")
    again = write_jsonl(tmp_path / "again.jsonl", [doc(2), doc(1, text="A new text.")])
    with pytest.raises(InvalidDocument, match="again.jsonl:2: id 'd1' already exists"):
        ingest_files([again], config, embed=None, audit=store)  # deleting: still in the catalog
    Catalog(config.storage).remove(["d1"])
    for state in (DeletionState.REMOVED, DeletionState.RETRAINED):
        store.advance_deletion(request.records, state)
        with pytest.raises(
            InvalidDocument,
            match=rf"again.jsonl:2: document 'd1' is still being deleted \(deletion {state}, "
            rf"job {request.job_id}\); ingest it again once that job has finished",
        ):
            ingest_files([again], config, embed=None, audit=store)
        assert Catalog(config.storage).ids() == {"d0"}
    store.advance_deletion(request.records, DeletionState.PURGED)
    assert ingest_files([again], config, embed=None, audit=store).accepted == 2


def test_replace_may_follow_a_replace_but_never_a_delete(config, store):
    records = lambda text: [RawRecord("r", doc(1, text=text))]  # noqa: E731
    ingest_records(records("zero"), config, embed=None, audit=store)
    replace, calls = replacer(config, store)
    ingest_records(records("one"), config, embed=None, audit=store, replace=replace)
    ingest_records(records("two"), config, embed=None, audit=store, replace=replace)
    ingest_records(records("two"), config, embed=None, audit=store, replace=replace)  # same text
    ingest_records(records("zero"), config, embed=None, audit=store, replace=replace)
    assert calls == [["d1"]] * 4  # the earlier deletions are unfinished: fine, those rows are gone
    assert [r["text"] for r in Catalog(config.storage).read(["id", "text"]).to_pylist()] == ["zero"]
    assert [d.state for d in store.deletions("d1")] == [DeletionState.REMOVED] * 4
    request_delete(store, Catalog(config.storage), ["d1"], "test", "test")  # DELETE d1
    assert [d.state for d in store.deletions("d1")][-1] == DeletionState.DELETING  # "zero", anew
    with pytest.raises(InvalidDocument, match="'d1' is still being deleted"):
        ingest_records(records("three"), config, embed=None, audit=store, replace=replace)
    assert len(calls) == 4  # refused before anything was revoked
    Catalog(config.storage).remove(["d1"])
    with pytest.raises(InvalidDocument, match="'d1' is still being deleted"):  # not a replace now
        ingest_records(records("three"), config, embed=None, audit=store, replace=replace)


def test_a_replace_revokes_only_after_the_fragment_is_built(config, store, monkeypatch):
    ingest_records([RawRecord("r", doc(1))], config, embed=None, audit=store)
    replace, calls = replacer(config, store)

    def unbuildable(*args, **kwargs):
        raise pa.ArrowInvalid("cannot encode")

    monkeypatch.setattr(Catalog, "build", unbuildable)
    with pytest.raises(pa.ArrowInvalid):
        ingest_records(
            [RawRecord("r", doc(1, text="new"))], config, embed=None, audit=store, replace=replace
        )
    assert calls == [] and store.deletions("d1") == []  # nothing revoked, nothing recorded


def test_the_audit_row_is_written_inside_the_ingest_critical_section(config, store):
    """Point 6: no other catalog change can land between an ingest and its audit row."""
    seen = []

    class Audit:  # the store, watching its audit row being written
        def __getattr__(self, name):
            return getattr(store, name)

        def append_audit(self, actor, action, **details):
            got = threading.Event()

            def other_ingest():
                with ingest_lock(store):
                    got.set()

            thread = threading.Thread(target=other_ingest)
            thread.start()
            seen.append(got.wait(0.3))  # another ingest cannot start: the lock is held
            store.append_audit(actor, action, **details)
            others.append((thread, got))

    others = []
    ingest_records([RawRecord("r", doc(1))], config, embed=None, audit=Audit())
    ((thread, got),) = others
    thread.join(10)  # and takes its turn once this ingest is done
    assert seen == [False] and got.is_set()
    assert store.audit_log()[-1].action == "ingest"
