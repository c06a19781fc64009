"""Storage through ``pyarrow.fs``: one code path for local directories and ``s3://`` URIs.

A location is a URI string. Local paths may be given plainly (``/data/as``) or as
``file:///data/as``; object stores as ``s3://bucket/prefix`` (with pyarrow's query
options, e.g. ``?endpoint_override=127.0.0.1:9000&scheme=http``).

Writes that must be all-or-nothing go through :func:`write_atomic`: on a local filesystem
the bytes land in a private hidden sibling file that is renamed into place (fsynced, with
its directory, when the write must be durable); on an object store a single PUT is already
atomic (the object appears whole or not at all).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from adapterswap.storage.privacy import FILE_MODE


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path inside it."""

    fs: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts))


def resolve(uri: str) -> Location:
    """Turn a URI or local path into a :class:`Location`."""
    if "://" not in uri:
        fs = pafs.LocalFileSystem()
        return Location(fs, fs.normalize_path(os.path.abspath(os.path.expanduser(uri))))
    fs, path = pafs.FileSystem.from_uri(uri)
    return Location(fs, path.rstrip("/"))


def read_bytes(loc: Location) -> bytes:
    """The whole file. On an object store, in one GET: a stream reads in 256 KiB ranged GETs,
    which splice the old and new object together when an overwrite lands in between."""
    with loc.fs.open_input_file(loc.path) as f:
        return f.read()


def write_atomic(loc: Location, data: bytes, *, durable: bool) -> None:
    """Write ``data`` so that readers see either the old state or the whole new file.

    On a local filesystem the bytes go to a hidden sibling (0600) that is renamed into place.
    With ``durable``, the sibling is fsynced before the rename and the directory after it:
    once this returns, the file survives a crash or a power loss. Without it (caches that
    are rebuilt on demand) a power loss may lose the file, never leave half of it. On an
    object store one PUT is atomic, and durable when it is acknowledged, either way.
    """
    if not loc.is_local:
        loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
        with loc.fs.open_output_stream(loc.path) as out:
            out.write(data)
        return
    path = Path(loc.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same filesystem, so the rename is atomic; readers skip dot-files.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with open(fd, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)


def delete_dir(loc: Location) -> None:
    """Delete a directory and everything in it (a no-op when it is already gone)."""
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
        loc.fs.delete_dir(loc.path)


def list_files(loc: Location, suffix: str = "") -> list[str]:
    """Paths of the files directly or recursively under ``loc`` ending in ``suffix``, sorted.

    Staging and hidden entries (names starting with ``_`` or ``.``) are skipped.
    """
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=True)
    found = []
    for info in loc.fs.get_file_info(selector):
        rel = posixpath.relpath(info.path, loc.path)
        if info.type != pafs.FileType.File or any(p[:1] in "._" for p in rel.split("/")):
            continue
        if info.path.endswith(suffix):
            found.append(info.path)
    return sorted(found)
