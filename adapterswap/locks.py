"""Advisory file locks in the home directory, serialising operations per home."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def home_lock(home: Path, name: str) -> Iterator[None]:
    """Hold ``<home>/<name>.lock`` exclusively (POSIX ``flock``) for the block."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f"{name}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
