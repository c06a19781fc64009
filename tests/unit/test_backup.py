"""Backup and restore: a round trip gives back the same store rows, catalog and files, byte for
byte; a damaged, incomplete or misplaced backup is refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from support import publish_random_adapter

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_files
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import BackupError
from adapterswap.ops.backup import BackupSummary, backup_home, restore_home
from adapterswap.storage.fs import resolve
from adapterswap.store.locks import exclusive
from adapterswap.store.registry import AdapterRegistry

HR = "hr.b0001.000"
OPS = "ops.b0002.000"
WEIGHTS = f"storage/adapters/{HR}/v2/adapter_model.safetensors"


def write_docs(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def populate(config: AdapterSwapConfig, registry: AdapterRegistry, embed, tmp: Path) -> None:
    """Two ingests, three published adapter versions, keys, a job and a deletion in flight."""
    hr = [{"id": f"h{i}", "text": f"hr fact {i}", "group": "hr"} for i in range(3)]
    ops = [{"id": f"o{i}", "text": f"ops fact {i}", "group": "ops"} for i in range(2)]
    ingest_files([write_docs(tmp / "hr.jsonl", hr)], config, embed=None, audit=registry)
    ingest_files([write_docs(tmp / "ops.jsonl", ops)], config, embed=None, audit=registry)
    texts = [r["text"] for r in hr]
    ids = [r["id"] for r in hr]
    publish_random_adapter(config, registry, embed, HR, "hr", texts, seed=1, doc_ids=ids)
    publish_random_adapter(config, registry, embed, HR, "hr", texts, seed=2, doc_ids=ids)
    publish_random_adapter(
        config, registry, embed, OPS, "ops", ["ops fact 0", "ops fact 1"], 3, ["o0", "o1"]
    )
    registry.create_key("ann", ["hr"], admin=True)
    _, revoked = registry.create_key("bob", ["ops"])
    registry.revoke_key(revoked.key_id)
    registry.create_job("train", "test", actor="test")
    registry.begin_delete(["o1"], "test", actor="test")


@dataclass
class Source:
    config: AdapterSwapConfig
    registry: AdapterRegistry


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_config, embed):
    """A populated home whose registry stays open, as the store actor keeps it."""
    tmp = tmp_path_factory.mktemp("source")
    config = tiny_config(home=tmp / "home")
    registry = AdapterRegistry(config.db_path)
    populate(config, registry, embed, tmp)
    yield Source(config, registry)
    registry.close()


def dump_store(db_path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order."""
    conn = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"'), key=repr) for t in tables}
    finally:
        conn.close()


def storage_files(storage_uri: str) -> dict[str, bytes]:
    """Every file under the storage root by relative path, read without the project's helpers."""
    root = resolve(storage_uri)
    selector = pafs.FileSelector(root.path, allow_not_found=True, recursive=True)
    found = {}
    for info in root.fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            with root.fs.open_input_stream(info.path) as stream:
                found[info.path[len(root.path) + 1 :]] = stream.read()
    return found


def catalog_rows(storage_uri: str) -> list[dict]:
    return sorted(Catalog(storage_uri).read().to_pylist(), key=lambda r: r["id"])


def test_round_trip_gives_back_every_row_and_byte(source, tmp_path, tiny_config):
    wal = Path(f"{source.config.db_path}-wal")
    assert wal.stat().st_size > 0  # recent commits live in the WAL: a file copy would miss them

    made = backup_home(source.config, tmp_path / "bk")

    manifest = json.loads((tmp_path / "bk" / "backup.json").read_text())
    assert manifest["format"] == "adapterswap-backup" and manifest["format_version"] == 1
    assert manifest["epoch"] == source.registry.epoch() == made.epoch > 0
    assert manifest["storage_uri"] == source.config.storage
    for entry in manifest["files"]:
        data = (tmp_path / "bk" / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])
    assert not (tmp_path / "bk" / "store.sqlite-wal").exists()

    target = tiny_config(home=tmp_path / "restored")
    restored = restore_home(target, tmp_path / "bk")

    original = storage_files(source.config.storage)
    assert {p.split("/")[0] for p in original} == {"catalog", "adapters"}
    assert f"adapters/{HR}/v1/adapter_model.safetensors" in original
    assert storage_files(target.storage) == original
    assert catalog_rows(target.storage) == catalog_rows(source.config.storage)
    assert len(catalog_rows(target.storage)) == 5
    rows = dump_store(target.db_path)
    assert rows == dump_store(source.config.db_path)
    assert all(rows[t] for t in ("adapters", "versions", "lineage", "api_keys", "audit"))
    assert all(rows[t] for t in ("jobs", "deletions"))
    assert restored == BackupSummary(
        str(tmp_path / "bk"), made.files, made.bytes, made.epoch, target.storage
    )
    assert made.files == len(original) + 1  # plus the store

    # The restored home is a working one: the registry opens and sees the same active set.
    reopened = AdapterRegistry(target.db_path)
    try:
        assert reopened.active_snapshot() == source.registry.active_snapshot()
        assert reopened.unfinished_deletions() == source.registry.unfinished_deletions()
    finally:
        reopened.close()


def test_backup_refuses_a_destination_that_is_not_empty(source, tmp_path, tiny_config):
    dest = tmp_path / "bk"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(BackupError, match=f"backup destination {re.escape(str(dest))} is not an"):
        backup_home(source.config, dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]

    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(BackupError, match="is not an empty directory"):
        backup_home(source.config, afile)
    with pytest.raises(BackupError, match="inside the storage"):
        backup_home(source.config, Path(source.config.storage) / "catalog" / "bk")
    with pytest.raises(BackupError, match="no store at .*nothing to back up"):
        backup_home(tiny_config(home=tmp_path / "empty"), tmp_path / "bk2")


def test_an_empty_destination_directory_is_accepted(source, tmp_path):
    (tmp_path / "bk").mkdir()
    assert backup_home(source.config, tmp_path / "bk").files > 1


@pytest.fixture
def backup(source, tmp_path) -> Path:
    backup_home(source.config, tmp_path / "bk")
    return tmp_path / "bk"


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("flip", r"is damaged: sha256 [0-9a-f]{16}\.\.\., backup\.json says"),
        ("truncate", r"is damaged: \d+ bytes, backup\.json says \d+ bytes"),
        ("remove", r"is missing, but backup\.json lists it"),
    ],
)
def test_restore_refuses_a_damaged_file_before_writing(
    backup, tmp_path, damage, problem, tiny_config
):
    path = backup / WEIGHTS
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-1]))
    else:
        path.unlink()
    target = tiny_config(home=tmp_path / "target")
    with pytest.raises(
        BackupError, match=f"{re.escape(str(path))} {problem}.*nothing was restored"
    ):
        restore_home(target, backup)
    assert not target.home_path.exists()  # no store, no storage, not even a lock file


def test_restore_refuses_a_tampered_store_or_manifest(backup, tmp_path, tiny_config):
    target = tiny_config(home=tmp_path / "target")
    manifest_path = backup / "backup.json"
    manifest = json.loads(manifest_path.read_text())

    escaping = {**manifest, "files": [*manifest["files"], {**manifest["files"][1]}]}
    escaping["files"][-1]["path"] = "storage/catalog/../../../outside.parquet"
    manifest_path.write_text(json.dumps(escaping))
    with pytest.raises(BackupError, match="'storage/catalog/../../../outside.parquet' is not one"):
        restore_home(target, backup)

    manifest_path.write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(BackupError, match="version 2, this code reads 'adapterswap-backup' vers"):
        restore_home(target, backup)

    manifest_path.write_text(json.dumps({**manifest, "epoch": manifest["epoch"] + 1}))
    with pytest.raises(BackupError, match="the store does not belong to this backup"):
        restore_home(target, backup)
    assert not target.home_path.exists()


def test_restore_refuses_a_backup_without_backup_json(backup, tmp_path, tiny_config):
    (backup / "backup.json").unlink()  # what an interrupted backup looks like
    target = tiny_config(home=tmp_path / "target")
    with pytest.raises(BackupError, match="backup.json does not exist: .* an incomplete one"):
        restore_home(target, backup)
    assert not target.home_path.exists()


def test_restore_into_a_used_home_needs_force(source, backup, tmp_path, embed, tiny_config):
    target = tiny_config(home=tmp_path / "target")
    registry = AdapterRegistry(target.db_path)
    registry.create_key("eve", ["hr"])
    other = [{"id": "x1", "text": "another home's fact", "group": "hr"}]
    ingest_files([write_docs(tmp_path / "x.jsonl", other)], target, embed=None, audit=registry)
    leftover_wal = Path(f"{target.db_path}-wal").read_bytes()  # as a crashed process leaves it
    registry.close()
    Path(f"{target.db_path}-wal").write_bytes(leftover_wal)
    before = storage_files(target.storage)

    with pytest.raises(BackupError, match="already has a store .*give --force to replace it"):
        restore_home(target, backup)
    assert storage_files(target.storage) == before

    restored = restore_home(target, backup, force=True)
    assert restored.epoch == source.registry.epoch()
    assert storage_files(target.storage) == storage_files(source.config.storage)  # x1 is gone
    assert catalog_rows(target.storage) == catalog_rows(source.config.storage)
    assert dump_store(target.db_path) == dump_store(source.config.db_path)


def test_restore_refuses_storage_that_holds_files_without_a_store(backup, tmp_path, tiny_config):
    target = tiny_config(home=tmp_path / "target")
    fragment = Path(target.storage) / "catalog" / "part-x.parquet"
    fragment.parent.mkdir(parents=True)
    fragment.write_bytes(b"not yours")
    with pytest.raises(BackupError, match="already holds 1 catalog or adapter file"):
        restore_home(target, backup)
    assert not target.db_path.exists() and fragment.read_bytes() == b"not yours"


@pytest.mark.parametrize("lock", ["train", "ingest"])
def test_backup_waits_while_a_job_or_an_ingest_holds_its_lock(tmp_path, lock, tiny_config):
    config = tiny_config(home=tmp_path / "home")
    store = AdapterRegistry(config.db_path)
    dest = tmp_path / "bk"
    done: list[BackupSummary] = []
    worker = threading.Thread(target=lambda: done.append(backup_home(config, dest)))
    with exclusive(store, lock):
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not (dest / "backup.json").exists()
    worker.join(timeout=30)
    assert not worker.is_alive() and done and (dest / "backup.json").is_file()


# -- s3:// storage -------------------------------------------------------------------------


def test_round_trip_over_s3(tmp_path, s3_query, tiny_config, embed):
    config = tiny_config(home=tmp_path / "home", storage_uri=f"s3://bucket/backup/src?{s3_query}")
    registry = AdapterRegistry(config.db_path)
    try:
        docs = [{"id": f"s{i}", "text": f"fact {i}", "group": "ops"} for i in range(2)]
        ingest_files([write_docs(tmp_path / "d.jsonl", docs)], config, embed=None, audit=registry)
        publish_random_adapter(config, registry, embed, "ops.b0001.000", "ops", ["fact 0"], 1)
        made = backup_home(config, tmp_path / "bk")
    finally:
        registry.close()
    original = storage_files(config.storage)
    assert len(original) == 6 and made.files == 7  # 1 fragment, 5 adapter files, the store
    assert json.loads((tmp_path / "bk" / "backup.json").read_text())["storage_uri"] == (
        "s3://bucket/backup/src"  # no endpoint or credentials from the query
    )

    target = tiny_config(
        home=tmp_path / "restored", storage_uri=f"s3://bucket/backup/copy?{s3_query}"
    )
    restore_home(target, tmp_path / "bk")
    assert storage_files(target.storage) == original
    assert catalog_rows(target.storage) == catalog_rows(config.storage)
    assert dump_store(target.db_path) == dump_store(config.db_path)
    with pytest.raises(BackupError, match="storage s3://bucket/backup/copy already holds 6"):
        restore_home(
            tiny_config(home=tmp_path / "third", storage_uri=target.storage), tmp_path / "bk"
        )


def test_a_backup_can_be_moved_before_it_is_restored(backup, tmp_path, tiny_config):
    moved = tmp_path / "elsewhere" / "bk"
    shutil.move(backup, moved)
    target = tiny_config(home=tmp_path / "target")
    assert restore_home(target, moved).backup == str(moved)


def test_a_backup_of_an_older_store_schema_restores_and_is_migrated(tmp_path, tiny_config):
    """A backup taken before the store's migrations (schema 1) stays restorable."""
    old_store = Path(__file__).parent.parent / "data" / "store_v1.sqlite"
    backup = tmp_path / "bk"
    backup.mkdir()
    shutil.copyfile(old_store, backup / "store.sqlite")
    data = old_store.read_bytes()
    manifest = {
        "format": "adapterswap-backup",
        "format_version": 1,
        "created_at": "2026-11-25T00:00:00+00:00",
        "epoch": 5,
        "storage_uri": "/elsewhere",
        "files": [
            {"path": "store.sqlite", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        ],
    }
    (backup / "backup.json").write_text(json.dumps(manifest))
    target = tiny_config(home=tmp_path / "home")
    restore_home(target, backup)
    with sqlite3.connect(target.db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 2
    assert AdapterRegistry(target.db_path).epoch() == 5
