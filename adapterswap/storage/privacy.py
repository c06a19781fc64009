"""Private by default: the home and everything in it belong to the server's user alone.

The home holds every group's text (the catalog), the adapters trained on it, the store
(key hashes, audit log) and backups, so nothing in it may be readable by another user of
the machine, whatever umask the server was started with:

- every process that writes state (the CLI, the store actor, job runners, Ray Train
  workers, Serve replicas) calls :func:`private_process` first: umask 077, so every file
  and directory it creates, by our code or a library's (pyarrow, safetensors, Ray Train's
  checkpoints, SQLite's journal), is 0600 / 0700;
- :func:`private_home` creates the home 0700 and tightens one an older version left open;
- :func:`private_file` creates or tightens one file to 0600 (the store's SQLite files).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_process() -> None:
    """From now on this process creates files 0600 and directories 0700."""
    os.umask(PRIVATE_UMASK)


def private_home(home: Path) -> Path:
    """Create ``home`` (and missing parents) and make it 0700; returns it."""
    private_process()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, DIR_MODE)
    return home


def private_file(path: Path) -> None:
    """Create ``path`` empty if missing, and make it 0600 either way."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE))
    os.chmod(path, FILE_MODE)
