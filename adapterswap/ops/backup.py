"""Backup and restore of a home's state: the store (SQLite) and the storage (catalog, adapters).

A backup is a local directory::

    store.sqlite                      the registry: one consistent snapshot (sqlite3 backup API)
    storage/catalog/*.parquet         the document catalog, byte for byte
    storage/adapters/<id>/v<N>/...    every adapter version's files, byte for byte
    backup.json                       written last: format, epoch, every file's size and sha256

:func:`backup_home` holds the home's ``train`` and ``ingest`` locks while it copies, so no
training, deletion or ingest changes a storage file meanwhile. The store may still change
(keys, audit rows, revocations), but none of those changes touches a file, so the snapshot,
taken at one instant, is consistent with the files. A directory without ``backup.json`` is
an interrupted backup, and :func:`restore_home` refuses it.

:func:`restore_home` checks ``backup.json`` and every file's size and hash before it writes
anything, then writes the storage files and the store last: a crash mid-restore leaves files
without a store (run it again with ``force``), never a store naming files that are missing.

Not copied: ``<home>/models`` (a cache, rebuilt on demand), ``<storage>/checkpoints`` (Ray
Train's scratch space while a shard trains) and config files.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import BackupError
from adapterswap.storage.fs import Location, list_files, read_bytes, resolve, write_atomic
from adapterswap.storage.layout import ADAPTERS, CATALOG, StorageLayout
from adapterswap.storage.privacy import private_file, private_home
from adapterswap.store.locks import exclusive
from adapterswap.store.registry import AdapterRegistry
from adapterswap.store.schema import SCHEMA_VERSION, stored_schema_version

BACKUP_FORMAT = "adapterswap-backup"
BACKUP_FORMAT_VERSION = 1
BACKUP_MANIFEST = "backup.json"
STORE_FILE = "store.sqlite"
STORAGE_DIR = "storage"
# The storage subtrees that hold state; checkpoints/ is scratch space of running trainings.
STORAGE_PARTS = (CATALOG, ADAPTERS)


class BackupFile(BaseModel):
    """One file of a backup, as ``backup.json`` lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        description="'/'-separated path inside the backup: store.sqlite or storage/..."
    )
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the file's bytes.")


class BackupManifest(BaseModel):
    """``backup.json``: what a complete backup holds."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field(description=f"Always {BACKUP_FORMAT!r}.")
    format_version: int = Field(description="The layout's version; restore reads only its own.")
    created_at: str = Field(description="When the backup was taken, ISO-8601 UTC.")
    epoch: int = Field(ge=0, description="The store's epoch in the snapshot.")
    storage_uri: str = Field(description="The storage copied from, without URI query options.")
    files: list[BackupFile] = Field(description="Every file of the backup except backup.json.")


@dataclass(frozen=True)
class BackupSummary:
    """What a backup or restore copied."""

    backup: str  # the backup directory
    files: int
    bytes: int
    epoch: int
    storage: str  # the storage copied from (backup) or into (restore), without query options


def backup_home(config: AdapterSwapConfig, dest: str | os.PathLike[str]) -> BackupSummary:
    """Copy the store and the storage's catalog and adapters into ``dest``, a new directory.

    ``dest`` must not exist or be empty. Ingest, training and deletion wait meanwhile.
    """
    target = _empty_destination(dest, config)
    if not config.db_path.is_file():
        raise BackupError(f"no store at {config.db_path}: nothing to back up; check --home")
    root = StorageLayout.from_config(config).root
    try:
        with _quiesced(config.db_path):
            private_home(target)
            private_file(target / STORE_FILE)
            epoch = _snapshot_store(config.db_path, target / STORE_FILE)
            files = [_describe(STORE_FILE, (target / STORE_FILE).read_bytes())]
            for loc in _storage_files(root):
                rel = f"{STORAGE_DIR}/{posixpath.relpath(loc.path, root.path)}"
                data = read_bytes(loc)
                _write_local(target / rel, data)
                files.append(_describe(rel, data))
            manifest = BackupManifest(
                format=BACKUP_FORMAT,
                format_version=BACKUP_FORMAT_VERSION,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                epoch=epoch,
                storage_uri=_shown(config.storage),
                files=files,
            )
            # Last: its presence is what marks the backup complete.
            body = manifest.model_dump_json(indent=2) + "\n"
            _write_local(target / BACKUP_MANIFEST, body.encode())
    except OSError as exc:
        raise BackupError(
            f"backup to {target} failed: {exc}; {target} holds an incomplete backup "
            "(no backup.json): delete it and try again"
        ) from exc
    size = sum(f.size for f in files)
    return BackupSummary(str(target), len(files), size, epoch, _shown(config.storage))


def verify_backup(src: str | os.PathLike[str]) -> BackupManifest:
    """Read ``src/backup.json`` and check every file it lists (size and sha256) and the store.

    Raises :class:`BackupError` naming the first bad file and what is wrong with it.
    """
    src = Path(src).expanduser()
    manifest = _read_manifest(src)
    for entry in manifest.files:
        _read_verified(src, entry)
    store = src / STORE_FILE
    try:
        conn = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            epoch = _store_epoch(conn, store)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{store}: not a readable SQLite store ({exc})") from None
    if epoch != manifest.epoch:
        raise BackupError(
            f"{store}: its epoch is {epoch}, backup.json says {manifest.epoch}: "
            "the store does not belong to this backup"
        )
    return manifest


def restore_home(
    config: AdapterSwapConfig, src: str | os.PathLike[str], *, force: bool = False
) -> BackupSummary:
    """Restore the backup ``src`` into the configured home and storage.

    Everything is verified before anything is written. The target home must have no store
    and the target storage no catalog or adapter files, unless ``force``: then the store is
    replaced and catalog and adapter files the backup does not hold are deleted.
    """
    src = Path(src).expanduser()
    try:
        manifest = verify_backup(src)
    except (BackupError, OSError) as exc:
        raise BackupError(f"{exc}; nothing was restored") from None
    root = StorageLayout.from_config(config).root
    entries = [f for f in manifest.files if f.path != STORE_FILE]
    store = next(f for f in manifest.files if f.path == STORE_FILE)
    with _quiesced(config.db_path):
        if not force:
            _refuse_non_empty(config, root)
        try:
            for entry in entries:
                data = _read_verified(src, entry)
                write_atomic(_storage_target(root, entry), data, durable=True)
            if force:
                keep = {_storage_target(root, e).path for e in entries}
                for loc in _storage_files(root):
                    if loc.path not in keep:
                        root.fs.delete_file(loc.path)
            _install_store(config.db_path, _read_verified(src, store))
        except (BackupError, OSError) as exc:
            raise BackupError(
                f"restore from {src} failed: {exc}; once the cause is fixed, run restore "
                "again with --force"
            ) from exc
    size = sum(f.size for f in manifest.files)
    return BackupSummary(
        str(src), len(manifest.files), size, manifest.epoch, _shown(config.storage)
    )


# -- helpers -------------------------------------------------------------------------------


@contextmanager
def _quiesced(db_path: Path) -> Iterator[None]:
    """Hold the store's ``train`` and ``ingest`` locks: no training, deletion or ingest runs.

    Taken in the order the delete job takes them (train, then ingest), so they cannot deadlock.
    A home without a store has nothing running against it (a restore into a new home).
    """
    if not db_path.exists():
        yield
        return
    store = AdapterRegistry(db_path)
    try:
        with exclusive(store, "train"), exclusive(store, "ingest"):
            yield
    finally:
        store.close()


def _shown(uri: str) -> str:
    """A storage URI without its query options, which may carry credentials."""
    return uri.split("?", 1)[0]


def _empty_destination(dest: str | os.PathLike[str], config: AdapterSwapConfig) -> Path:
    if "://" in os.fspath(dest):
        raise BackupError(f"backup destination {dest}: must be a local directory, not a URI")
    target = Path(dest).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(
            f"backup destination {os.fspath(dest)} is not an empty directory; "
            "give a new or empty directory, a backup never overwrites one"
        )
    root = StorageLayout.from_config(config).root
    if root.is_local and target.is_relative_to(root.path):
        raise BackupError(
            f"backup destination {os.fspath(dest)} is inside the storage {root.path}; its "
            "files would be read as catalog or adapter files: put the backup elsewhere"
        )
    return target


def _snapshot_store(db_path: Path, target: Path) -> int:
    """Copy the live store with SQLite's online backup API; returns the snapshot's epoch.

    A file copy could miss commits still in the WAL or catch a page mid-write; the backup
    API copies one consistent snapshot even while the store actor writes.
    """
    source = sqlite3.connect(db_path, timeout=60)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        # The leases are who holds a lock right now (this backup, among others): not state.
        copy.execute("DELETE FROM leases")
        copy.commit()
        # One self-contained file: no -wal beside it to lose when the backup is moved.
        copy.execute("PRAGMA journal_mode = DELETE")
        return _store_epoch(copy, db_path)
    finally:
        copy.close()
        source.close()


def _store_epoch(conn: sqlite3.Connection, where: Path) -> int:
    """The epoch of a store, after checking this code can read its schema: its own, or an
    older one, which the store's migrations upgrade once it is restored."""
    found = stored_schema_version(conn)
    if not 1 <= found <= SCHEMA_VERSION:
        raise BackupError(
            f"{where}: store schema version {found}, this code reads 1 to {SCHEMA_VERSION}; "
            "use the AdapterSwap version that wrote it"
        )
    return int(conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0])


def _storage_files(root: Location) -> list[Location]:
    return [Location(root.fs, p) for part in STORAGE_PARTS for p in list_files(root.child(part))]


def _storage_target(root: Location, entry: BackupFile) -> Location:
    return root.child(*entry.path.split("/")[1:])  # storage/<rel> -> <root>/<rel>


def _write_local(path: Path, data: bytes) -> None:
    """Backup files and a restored store are written durably, like the state they copy."""
    write_atomic(resolve(os.fspath(path)), data, durable=True)


def _describe(rel: str, data: bytes) -> BackupFile:
    return BackupFile(path=rel, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _read_manifest(src: Path) -> BackupManifest:
    path = src / BACKUP_MANIFEST
    if not path.is_file():
        raise BackupError(
            f"{path} does not exist: {src} is not a backup, or an incomplete one "
            "(a backup writes backup.json last)"
        )
    try:
        manifest = BackupManifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise BackupError(f"{path} is not a valid backup manifest: {exc}") from None
    if manifest.format != BACKUP_FORMAT or manifest.format_version != BACKUP_FORMAT_VERSION:
        raise BackupError(
            f"{path}: format {manifest.format!r} version {manifest.format_version}, this code "
            f"reads {BACKUP_FORMAT!r} version {BACKUP_FORMAT_VERSION}"
        )
    seen: set[str] = set()
    for entry in manifest.files:
        parts = entry.path.split("/")
        inside = (
            len(parts) >= 3
            and parts[0] == STORAGE_DIR
            and parts[1] in STORAGE_PARTS
            and not {"", ".", ".."} & set(parts)
        )
        if entry.path in seen or not (entry.path == STORE_FILE or inside):
            raise BackupError(f"{path}: file {entry.path!r} is not one a backup writes")
        seen.add(entry.path)
    if STORE_FILE not in seen:
        raise BackupError(f"{path}: lists no {STORE_FILE}")
    return manifest


def _read_verified(src: Path, entry: BackupFile) -> bytes:
    """The bytes of one backup file, checked against its size and sha256 in backup.json."""
    path = src / entry.path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"{path} is missing, but backup.json lists it") from None
    if len(data) != entry.size:
        raise BackupError(
            f"{path} is damaged: {len(data)} bytes, backup.json says {entry.size} bytes"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise BackupError(
            f"{path} is damaged: sha256 {digest[:16]}..., backup.json says {entry.sha256[:16]}..."
        )
    return data


def _refuse_non_empty(config: AdapterSwapConfig, root: Location) -> None:
    if config.db_path.exists():
        raise BackupError(
            f"home {config.home_path} already has a store ({config.db_path}): restore into a "
            "new home, or give --force to replace it"
        )
    present = [loc.path for loc in _storage_files(root)]
    if present:
        raise BackupError(
            f"storage {_shown(config.storage)} already holds {len(present)} catalog or adapter "
            f"file(s), e.g. {present[0]}: restore into empty storage, or give --force to "
            "replace them"
        )


def _install_store(db_path: Path, data: bytes) -> None:
    """Put the store file in place whole; a replaced store's -wal would replay into it."""
    for suffix in ("-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    _write_local(db_path, data)
    AdapterRegistry(db_path).close()  # a backup of an older schema is migrated now
