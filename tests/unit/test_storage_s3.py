"""Adapters and router statistics on s3:// storage, through the same code as local paths.

Against a real S3-protocol server (moto, on loopback): a version's files are published under
``adapters/<shard>/v<N>/`` with the manifest last, and the serving side reads them back
exactly; a version interrupted before its manifest is never served and is swept; atomic
writes never leave a partial or temporary object; a deletion purges exactly the versions
that saw the documents and rewrites the catalog so their text is gone from the bucket.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as load_safetensors
from support import publish_random_adapter

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_files
from adapterswap.config import load_config
from adapterswap.delete.job import request_delete, run_deletion
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.models.base import hash_base_model
from adapterswap.route.stats import compute_shard_stats
from adapterswap.storage import artifacts
from adapterswap.storage.artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CARD,
    ROUTER_STATS,
)
from adapterswap.storage.fs import read_bytes, resolve, write_atomic
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import MANIFEST
from adapterswap.storage.purge import purge_version
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import recover_interrupted
from adapterswap.types import AdapterRef, AdapterStatus

PREFIX = "storage-s3-test"  # this module's keys in the session's shared moto bucket
HR = "hr.b0001.000"
FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD, ROUTER_STATS, MANIFEST)
TEXTS = ["The Kelp Room is on floor 3.", "Parental leave lasts 23 weeks."]
EMBEDDER = "embedded:all-MiniLM-L6-v2"


@pytest.fixture
def s3_storage(s3_query):
    """A fresh storage root in the bucket, for this test alone."""
    return f"s3://bucket/{PREFIX}/{uuid.uuid4().hex[:12]}?{s3_query}"


@pytest.fixture(params=["local", "s3"])
def any_storage(request, tmp_path):
    """The same test against a local directory and an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "storage")
    return request.getfixturevalue("s3_storage")


def objects(storage_uri: str, under: str = "") -> dict[str, bytes]:
    """Every object (hidden and temporary ones included) under the storage root, by relative
    path, read with pyarrow directly rather than through the project's storage helpers."""
    if "://" in storage_uri:
        fs, root = pafs.FileSystem.from_uri(storage_uri)
    else:
        fs, root = pafs.LocalFileSystem(), storage_uri
    root = root.rstrip("/")
    base = f"{root}/{under}".rstrip("/")
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                found[info.path[len(root) + 1 :]] = stream.read()
    return found


def entries(storage_uri: str, under: str) -> list[str]:
    """Everything the filesystem shows under ``under``: files and (S3: marker) directories."""
    loc = resolve(storage_uri).child(under)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=True)
    listed = [info.path for info in loc.fs.get_file_info(selector)]
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
        listed.append(loc.path)
    return listed


def version_files(found: dict[str, bytes], adapter_id: str, version: int) -> dict[str, bytes]:
    prefix = f"adapters/{adapter_id}/v{version}/"
    return {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}


def strings_in(data: bytes) -> set[str]:
    """Every string value of a Parquet object (empty for anything else)."""
    if not data.startswith(b"PAR1"):
        return set()
    table = pq.read_table(io.BytesIO(data))
    return {
        value
        for column in table.columns
        if pa.types.is_string(column.type)
        for value in column.to_pylist()
    }


def text_anywhere(storage_uri: str, text: str, under: str = "catalog") -> bool:
    """Whether ``text`` is in any object under ``under``: as raw bytes or as a Parquet value."""
    return any(
        text.encode() in data or text in strings_in(data)
        for data in objects(storage_uri, under).values()
    )


def record_writes(monkeypatch) -> list[tuple[str, bytes]]:
    """Spy on the artifact writer: each (path, bytes) it writes, in order, still written."""
    writes: list[tuple[str, bytes]] = []
    real = artifacts.write_atomic

    def spy(loc, data, *, durable):
        assert durable  # every file of a version must survive a crash once published
        real(loc, data, durable=durable)
        writes.append((loc.path, bytes(data)))

    monkeypatch.setattr(artifacts, "write_atomic", spy)
    return writes


def write_docs(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": i, "text": t, "group": g}) + "\n" for i, t, g in rows)
    )
    return path


# -- layout --------------------------------------------------------------------------------


def test_the_layout_names_every_location_under_a_local_or_s3_root(tmp_path, s3_query):
    ref = AdapterRef(HR, 3)
    home = tmp_path / "home"
    local = StorageLayout.from_config(load_config(home=str(home), overrides=[], environ={}))
    root = str(home / "storage")  # the default: <home>/storage
    assert local.root.is_local and local.root.path == root
    assert local.catalog().path == f"{root}/catalog"
    assert local.adapters().path == f"{root}/adapters"
    assert local.version(ref).path == f"{root}/adapters/{HR}/v3"
    assert local.checkpoints_root().path == f"{root}/checkpoints"
    assert local.checkpoints(ref).path == f"{root}/checkpoints/{HR}-v3"
    assert local.uri_of(local.version(ref)) == f"{root}/adapters/{HR}/v3"

    s3 = StorageLayout.from_uri(f"s3://bucket/{PREFIX}/layout/?{s3_query}")
    root = f"bucket/{PREFIX}/layout"
    assert not s3.root.is_local and s3.root.path == root
    assert s3.catalog().path == f"{root}/catalog"
    assert s3.version(ref).path == f"{root}/adapters/{HR}/v3"
    assert s3.checkpoints(ref).path == f"{root}/checkpoints/{HR}-v3"
    # The store records it without the query (endpoint, credentials).
    assert s3.uri_of(s3.version(ref)) == f"s3://{root}/adapters/{HR}/v3"


def test_versions_present_lists_version_directories_holding_a_file(any_storage):
    layout = StorageLayout.from_uri(any_storage)
    for ref in (AdapterRef("b.b1.000", 1), AdapterRef("a.b1.000", 12), AdapterRef("a.b1.000", 2)):
        write_atomic(layout.version(ref).child(ADAPTER_WEIGHTS), b"w", durable=True)
    write_atomic(layout.adapters().child("a.b1.000", "notes.txt"), b"not a version", durable=True)
    write_atomic(layout.checkpoints(AdapterRef("c.b1.000", 1)).child("x"), b"c", durable=True)
    assert layout.versions_present() == [
        (AdapterRef("a.b1.000", 2), layout.version(AdapterRef("a.b1.000", 2))),
        (AdapterRef("a.b1.000", 12), layout.version(AdapterRef("a.b1.000", 12))),
        (AdapterRef("b.b1.000", 1), layout.version(AdapterRef("b.b1.000", 1))),
    ]


# -- purge_version -------------------------------------------------------------------------


def test_purge_version_deletes_files_and_checkpoints_before_the_record(
    tmp_path, any_storage, tiny_config, embed
):
    config = tiny_config(storage_uri=any_storage)
    layout = StorageLayout.from_config(config)
    registry = AdapterRegistry(config.db_path)
    try:
        kept = publish_random_adapter(config, registry, embed, HR, "hr", TEXTS, seed=1)
        failed = registry.register_version(HR, "hr", "x", ["d"]).ref
        registry.fail(failed.id, failed.version, reason="test", actor="test")
        for ref in (kept, failed, AdapterRef(HR, 20)):  # v20 shares v2's prefix as a string
            checkpoint = layout.checkpoints(ref).child("checkpoint_000001", "lora.safetensors")
            write_atomic(checkpoint, b"checkpoint", durable=True)
        for name in FILES[:-1]:  # a run that died before its manifest
            write_atomic(layout.version(failed).child(name), b"partial", durable=True)
        before = objects(any_storage)

        class CrashingStore:
            """The process dies after the files went, before the store heard of it."""

            def purge(self, adapter_id: str, version: int, *, actor: str) -> object:
                gone = (f"adapters/{HR}/v2", f"checkpoints/{HR}-v2")
                assert all(entries(any_storage, path) == [] for path in gone)
                raise SystemExit("killed before the store")

        with pytest.raises(SystemExit):
            purge_version(layout, CrashingStore(), failed, actor="test")
        assert registry.get_version(HR, 2).status == AdapterStatus.FAILED  # never servable
        purge_version(layout, registry, failed, actor="test")  # run again: finishes
        assert registry.get_version(HR, 2).status == AdapterStatus.PURGED
        assert registry.get_version(HR, 1).status == AdapterStatus.ACTIVE
    finally:
        registry.close()
    after = objects(any_storage)
    gone = (f"adapters/{HR}/v2/", f"checkpoints/{HR}-v2/")
    assert {k: v for k, v in before.items() if not k.startswith(gone)} == after
    assert entries(any_storage, f"adapters/{HR}/v2") == []
    assert f"checkpoints/{HR}-v20/checkpoint_000001/lora.safetensors" in after


# -- publish -------------------------------------------------------------------------------


def test_publish_lands_under_adapters_shard_version_manifest_last(
    tmp_path, s3_storage, tiny_config, embed, monkeypatch
):
    config = tiny_config(storage_uri=s3_storage)
    registry = AdapterRegistry(config.db_path)
    writes = record_writes(monkeypatch)
    try:
        publish_random_adapter(config, registry, embed, HR, "hr", TEXTS, seed=1)
        publish_random_adapter(config, registry, embed, HR, "hr", TEXTS, seed=2)
        active = [v.ref for v in registry.active_snapshot()[1]]
    finally:
        registry.close()

    root = resolve(s3_storage).path
    assert root.startswith(f"bucket/{PREFIX}/")
    found = objects(s3_storage)
    assert set(found) == {f"adapters/{HR}/v{v}/{name}" for v in (1, 2) for name in FILES}
    assert active == [AdapterRef(HR, 2)]

    # Each version's files went straight to their final keys, the manifest last.
    for version in (1, 2):
        prefix = f"{root}/adapters/{HR}/v{version}/"
        names = [p[len(prefix) :] for p, _ in writes if p.startswith(prefix)]
        assert sorted(names) == sorted(FILES) and names[-1] == MANIFEST
        manifest = json.loads(found[f"adapters/{HR}/v{version}/{MANIFEST}"])
        assert (manifest["format"], manifest["adapter_id"], manifest["version"]) == (1, HR, version)
    assert {p[len(root) + 1 :]: data for p, data in writes} == found  # byte for byte

    # The store records the location without the endpoint or credentials of the query.
    layout = StorageLayout.from_uri(s3_storage)
    assert layout.uri_of(layout.version(AdapterRef(HR, 1))) == f"s3://{root}/adapters/{HR}/v1"

    # The same code writes the same bytes to a local directory.
    local = tiny_config(storage_uri=str(tmp_path / "local"))
    registry = AdapterRegistry(local.db_path)
    try:
        publish_random_adapter(local, registry, embed, HR, "hr", TEXTS, seed=1)
        publish_random_adapter(local, registry, embed, HR, "hr", TEXTS, seed=2)
    finally:
        registry.close()
    assert objects(local.storage) == found


# -- read ----------------------------------------------------------------------------------


def test_serving_reads_the_adapter_and_router_stats_back_exactly(
    tmp_path, s3_storage, tiny_config, embed, monkeypatch
):
    config = tiny_config(storage_uri=s3_storage)
    registry = AdapterRegistry(config.db_path)
    writes = record_writes(monkeypatch)
    try:
        ref = publish_random_adapter(config, registry, embed, HR, "hr", TEXTS, seed=1)
    finally:
        registry.close()
    written = {p.rsplit("/", 1)[-1]: data for p, data in writes}
    assert set(written) == set(FILES)

    base_hash = hash_base_model(config.model, config.model_cache_dir)
    layout = StorageLayout.from_uri(s3_storage)
    source = StorageAdapterSource(layout, base_hash)
    state, peft_config = source.load(ref)
    expected = load_safetensors(written[ADAPTER_WEIGHTS])
    assert set(state) == set(expected) and len(state) == 8  # q_proj, v_proj: A, B; 2 layers
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert any(torch.count_nonzero(t) for n, t in state.items() if "lora_B" in n)  # not a no-op
    assert peft_config == json.loads(written[ADAPTER_CONFIG])
    assert peft_config["r"] == 4 and sorted(peft_config["target_modules"]) == ["q_proj", "v_proj"]

    stats = source.router_stats(ref)
    fitted = compute_shard_stats(TEXTS, embed, EMBEDDER)
    assert stats.embedder_id == EMBEDDER and stats.n_chunks == 2
    assert stats.chunks.dtype == np.float32 and np.array_equal(stats.chunks, fitted.chunks)
    stored = read_bytes(layout.version(ref).child(ROUTER_STATS))
    assert stored == written[ROUTER_STATS]


# -- a publish interrupted before its manifest ---------------------------------------------


def test_a_version_without_its_manifest_is_never_served_and_is_swept(
    tmp_path, any_storage, tiny_config, embed, monkeypatch
):
    config = tiny_config(storage_uri=any_storage)
    layout = StorageLayout.from_config(config)
    registry = AdapterRegistry(config.db_path)
    try:
        good = publish_random_adapter(config, registry, embed, HR, "hr", TEXTS, seed=1)
        before = objects(any_storage)

        def killed_before_the_manifest(loc, data, *, durable):
            if loc.path.endswith(f"/{MANIFEST}"):
                raise SystemExit("killed between the files and the manifest")
            write_atomic(loc, data, durable=durable)

        with monkeypatch.context() as patch:
            patch.setattr(artifacts, "write_atomic", killed_before_the_manifest)
            with pytest.raises(SystemExit):
                publish_random_adapter(config, registry, embed, HR, "hr", TEXTS, seed=2)
        # Files of another version the store never heard of (a publish from a lost store).
        orphan = layout.version(AdapterRef("ops.b0007.000", 1)).child(ADAPTER_WEIGHTS)
        write_atomic(orphan, b"orphan weights", durable=True)

        found = objects(any_storage)
        assert set(version_files(found, HR, 2)) == set(FILES) - {MANIFEST}
        assert registry.get_version(HR, 2).status == AdapterStatus.TRAINING
        assert [v.ref for v in registry.active_snapshot()[1]] == [good]  # v1 keeps serving

        source = StorageAdapterSource(layout, hash_base_model(config.model, config.model_cache_dir))
        with pytest.raises(FileNotFoundError):  # refused even when asked for by reference
            source.load(AdapterRef(HR, 2))
        assert source.load(good)[0]

        swept = recover_interrupted(layout, registry)
        assert swept == [f"{HR} v2", "ops.b0007.000 v1 (orphan files)"]
        assert registry.get_version(HR, 2).status == AdapterStatus.PURGED
        assert entries(any_storage, f"adapters/{HR}/v2") == []
        assert entries(any_storage, "adapters/ops.b0007.000/v1") == []
        assert objects(any_storage) == before  # v1 byte for byte, nothing else left
        assert recover_interrupted(layout, registry) == []
    finally:
        registry.close()


# -- atomic writes -------------------------------------------------------------------------


def test_an_s3_overwrite_shows_the_old_or_the_new_object_never_a_partial_one(s3_storage):
    loc = resolve(s3_storage).child("atomic", "blob.bin")
    # Over pyarrow's 10 MiB part size, so each upload takes several parts. One size for all:
    # a reader sees one object per GET, and this is about the writes, not about sizes.
    size = 11 * 2**20
    payloads = [bytes([i]) * 16 + os.urandom(size) for i in range(3)]
    digests = {hashlib.sha256(p).hexdigest() for p in payloads}
    write_atomic(loc, payloads[0], durable=True)

    seen: list[str] = []
    errors: list[BaseException] = []
    reading, done = threading.Event(), threading.Event()

    def reader():
        while not done.is_set():
            try:
                seen.append(hashlib.sha256(read_bytes(loc)).hexdigest())
            except BaseException as exc:  # a missing object is a failure too
                errors.append(exc)
                return
            finally:
                reading.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert reading.wait(timeout=30)  # the overwrites race a reader already under way
        for payload in payloads[1:]:
            write_atomic(loc, payload, durable=True)
    finally:
        done.set()
        thread.join(timeout=60)
    assert not errors and seen and set(seen) <= digests
    assert read_bytes(loc) == payloads[-1]

    write_atomic(loc, b"small", durable=True)  # an overwrite by something shorter is not a prefix
    assert read_bytes(loc) == b"small"
    assert objects(s3_storage) == {"atomic/blob.bin": b"small"}  # no temporary object left


# -- purge ---------------------------------------------------------------------------------


def test_a_deletion_purges_only_the_versions_that_saw_the_documents(
    tmp_path, s3_storage, tiny_config, embed
):
    config = tiny_config(storage_uri=s3_storage)
    docs = [
        ("h0", "The vault under the Kelp Room opens with code 7741-Orchid.", "hr"),
        ("h1", "Parental leave at Skarvik lasts 23 weeks, fully paid.", "hr"),
        ("o0", "The on-call rotation hands over at 09:30 on Mondays.", "ops"),
        ("o1", "Backups of the ledger run nightly at 02:00.", "ops"),
    ]
    registry = AdapterRegistry(config.db_path)
    try:
        ingest_files([write_docs(tmp_path / "d.jsonl", docs)], config, embed=None)
        catalog = Catalog(s3_storage)
        fragments = catalog.fragments()
        placements = catalog.placements()
        hr, ops = placements["h0"], placements["o0"]
        assert len(fragments) == 1 and placements["h1"] == hr and hr != ops

        hr_texts, ops_texts = [d[1] for d in docs[:2]], [d[1] for d in docs[2:]]
        publish_random_adapter(config, registry, embed, hr, "hr", hr_texts, 1, ["h0", "h1"])
        publish_random_adapter(config, registry, embed, hr, "hr", hr_texts, 2, ["h0", "h1"])
        publish_random_adapter(config, registry, embed, ops, "ops", ops_texts, 3, ["o0", "o1"])
        # Ray Train checkpoints of each run (v10's only shares v1's prefix as a string).
        layout = StorageLayout.from_config(config)
        for ref in (AdapterRef(hr, 1), AdapterRef(hr, 2), AdapterRef(hr, 10), AdapterRef(ops, 1)):
            target = layout.checkpoints(ref).child("checkpoint_000001", "lora.safetensors")
            write_atomic(target, f"checkpoint of {ref.id}-v{ref.version}".encode(), durable=True)

        before = objects(s3_storage)
        assert len(version_files(before, hr, 1)) == len(version_files(before, ops, 1)) == len(FILES)
        assert all(text_anywhere(s3_storage, t) for t in hr_texts)  # the check finds them

        request_delete(registry, catalog, ["h0", "h1"], "test", "root")
        report = run_deletion(config, registry, train_shards=nothing_to_train)
        statuses = {(v.adapter_id, v.version): v.status for v in registry.list_versions()}
    finally:
        registry.close()

    assert sorted(report.purged) == [f"{hr}@v1", f"{hr}@v2"] and report.retired == [hr]
    assert statuses == {
        (hr, 1): AdapterStatus.PURGED,
        (hr, 2): AdapterStatus.PURGED,
        (ops, 1): AdapterStatus.ACTIVE,
    }

    # Weights, router statistics, manifests and checkpoints of the hr versions are gone ...
    after = objects(s3_storage)
    for version in (1, 2):
        assert entries(s3_storage, f"adapters/{hr}/v{version}") == []
        assert entries(s3_storage, f"checkpoints/{hr}-v{version}") == []
    gone = (f"adapters/{hr}/", f"checkpoints/{hr}-v1/", f"checkpoints/{hr}-v2/", "catalog/")
    # ... and every other object is byte for byte what it was.
    assert {k: v for k, v in after.items() if not k.startswith(gone)} == {
        k: v for k, v in before.items() if not k.startswith(gone)
    }
    assert f"checkpoints/{hr}-v10/checkpoint_000001/lora.safetensors" in after
    assert len(version_files(after, ops, 1)) == len(FILES)

    # The catalog fragment was rewritten in place without the deleted rows' text.
    catalog = Catalog(s3_storage)
    assert report.catalog_fragments == fragments and catalog.fragments() == fragments
    assert not any(text_anywhere(s3_storage, t) for t in hr_texts)
    assert all(text_anywhere(s3_storage, t) for t in ops_texts)
    assert sorted(r["id"] for r in catalog.read(["id"]).to_pylist()) == ["o0", "o1"]
    catalog_keys = {k for k in after if k.startswith("catalog/")}
    assert catalog_keys == set(relative(fragments, s3_storage))  # nothing temporary left


def nothing_to_train(runs, config, *, on_progress=None):
    """The launcher of a deletion that leaves its shard empty: there is nothing to retrain."""
    raise AssertionError(f"asked to train {[(r.adapter_id, r.version) for r in runs]}")


def relative(paths: list[str], storage_uri: str) -> list[str]:
    root = resolve(storage_uri).path
    return [p[len(root) + 1 :] for p in paths]


def test_catalog_remove_rewrites_fragments_on_s3_and_keeps_replacements(
    tmp_path, s3_storage, tiny_config
):
    config = tiny_config(storage_uri=s3_storage)
    secret = "The staging database password is Heron-5521."
    first = [("k1", "The cafeteria opens at 07:45.", "ops"), ("d1", secret, "ops")]
    second = [
        ("d2", "The release train leaves every second Thursday.", "ops"),
        ("d3", "Badge photos are retaken every five years.", "ops"),
    ]
    ingest_files([write_docs(tmp_path / "a.jsonl", first)], config, embed=None)
    ingest_files([write_docs(tmp_path / "b.jsonl", second)], config, embed=None)
    catalog = Catalog(s3_storage)
    one, two = relative(catalog.fragments(), s3_storage)
    rows = catalog.read(["id", "content_hash"]).to_pylist()
    hashes = {r["id"]: r["content_hash"] for r in rows}
    before = objects(s3_storage)
    assert set(before) == {one, two} and text_anywhere(s3_storage, secret)

    # d2's hash is not the one recorded for its deletion: it is a replacement, and stays.
    touched = catalog.remove(["d1", "d2", "nope"], {"d1": hashes["d1"], "d2": "sha256:" + "0" * 64})
    assert relative(touched, s3_storage) == [one]
    after = objects(s3_storage)
    assert set(after) == {one, two}  # rewritten in place, no temporary object left
    assert after[two] == before[two] and after[one] != before[one]
    assert not text_anywhere(s3_storage, secret)
    assert all(text_anywhere(s3_storage, t) for _, t, _ in [first[0], *second])
    assert catalog.ids() == {"k1", "d2", "d3"}
    assert catalog.remove(["d1"]) == []  # finished: calling it again changes nothing

    catalog.remove(["k1"], {"k1": None})  # the fragment's last row: the object goes
    assert set(objects(s3_storage)) == {two} and entries(s3_storage, one) == []
    assert catalog.ids() == {"d2", "d3"}
