"""Private by default, durable when acknowledged (issue 12, point 6).

- The home is 0700 and every file in it 0600 whatever the umask the commands start with:
  the catalog holds every group's text, the store the key hashes and the audit log.
- An acknowledged ingest is on disk: its catalog fragment is fsynced, and so is its
  directory (the rename), before the ingest returns.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_records
from adapterswap.catalog.readers import RawRecord


def open_to_others(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) that a user other than the owner can use."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {mode:o}")
    return found


def adapterswap(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process started with the permissive umask 022."""
    return subprocess.run(
        [sys.executable, "-m", "adapterswap", "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.umask(0o022),
    )


def test_home_and_every_file_are_private_whatever_the_umask(tmp_path):
    home = tmp_path / "home"
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "hr-1", "group": "hr", "text": "Leave is 23 weeks."}) + "\n")
    adapterswap(home, "ingest", str(docs), "--set", "sharding.strategy=sequential")
    adapterswap(home, "keys", "create", "--user", "root", "--groups", "hr", "--admin")
    adapterswap(home, "backup", str(home / "backups" / "one"))
    files = {p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()}
    assert "store.sqlite" in files and any(f.startswith("storage/catalog/") for f in files)
    assert any(f.startswith("backups/one/") for f in files)
    assert open_to_others(home) == []


def test_an_existing_open_home_is_closed_on_first_use(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # as an older version left it
    (home / "store.sqlite").touch(mode=0o644)
    os.chmod(home / "store.sqlite", 0o644)
    adapterswap(home, "keys", "list")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "store.sqlite").stat().st_mode) == 0o600


def test_an_acknowledged_ingest_is_fsynced_file_and_directory(tiny_config, monkeypatch):
    config = tiny_config()
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    record = {"id": "hr-1", "group": "hr", "text": "Leave is 23 weeks."}
    result = ingest_records([RawRecord("r", record)], config, embed=None)
    fragment = Path(result.fragment)
    assert fragment.exists()
    catalog_dir = Path(Catalog(config.storage).location.path)
    # The data went to a temporary sibling, fsynced, then renamed: the file's bytes are on disk
    # under some name of that directory, and the directory (holding the rename) is fsynced last.
    assert any(Path(p).parent == catalog_dir and Path(p).name.endswith(".tmp") for p in synced)
    assert str(catalog_dir) in synced
    assert synced.index(str(catalog_dir)) > max(
        i for i, p in enumerate(synced) if p.endswith(".tmp")
    )
