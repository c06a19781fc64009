"""Where everything lives in storage: one object, built once from the configuration.

    <storage>/
        catalog/                      the document catalog (Parquet fragments)
        adapters/<adapter_id>/v<N>/   one published (or interrupted) adapter version
        checkpoints/<adapter_id>-v<N>/  that version's checkpoints while it trains (Ray Train's,
                                      or the training pool's step-<step>/ folders)
        checkpoints/pool-<id>/        a training pool's Ray Train run, while the pool runs

The storage root is a local path or an ``s3://`` URI (see :mod:`adapterswap.storage.fs`).
Every other module asks a :class:`StorageLayout` for its locations instead of parsing the
URI and joining names itself, so the layout is written down here and nowhere else.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from adapterswap.config import AdapterSwapConfig
from adapterswap.storage.fs import Location, resolve
from adapterswap.types import AdapterRef

CATALOG = "catalog"
ADAPTERS = "adapters"
CHECKPOINTS = "checkpoints"
VERSION_DIR = re.compile(r"v\d+")


@dataclass(frozen=True)
class StorageLayout:
    """The storage root and the location of each thing under it."""

    uri: str  # as configured, query options (endpoint, credentials) included
    root: Location

    @classmethod
    def from_uri(cls, uri: str) -> StorageLayout:
        return cls(uri, resolve(uri))

    @classmethod
    def from_config(cls, config: AdapterSwapConfig) -> StorageLayout:
        return cls.from_uri(config.storage)

    def catalog(self) -> Location:
        return self.root.child(CATALOG)

    def adapters(self) -> Location:
        return self.root.child(ADAPTERS)

    def version(self, ref: AdapterRef) -> Location:
        """The directory of one adapter version's files."""
        return self.adapters().child(ref.id, f"v{ref.version}")

    def checkpoints_root(self) -> Location:
        """Ray Train's storage path: one run directory per version trained."""
        return self.root.child(CHECKPOINTS)

    def checkpoints(self, ref: AdapterRef) -> Location:
        """The Ray Train run directory of one version (the run is named ``<id>-v<N>``)."""
        return self.checkpoints_root().child(f"{ref.id}-v{ref.version}")

    def uri_of(self, loc: Location) -> str:
        """The URI recorded in the store for a location: a plain path locally, s3://...
        otherwise, without the query options (which may carry credentials)."""
        return loc.path if loc.is_local else f"{self.uri.split('://', 1)[0]}://{loc.path}"

    def versions_present(self) -> list[tuple[AdapterRef, Location]]:
        """Every version directory holding a file, complete or not, sorted by reference."""
        root = self.adapters()
        selector = pafs.FileSelector(root.path, allow_not_found=True, recursive=True)
        found: dict[AdapterRef, Location] = {}
        for info in root.fs.get_file_info(selector):
            parts = posixpath.relpath(info.path, root.path).split("/")
            if info.type != pafs.FileType.File or len(parts) != 3:
                continue
            adapter_id, version_dir, _ = parts
            if VERSION_DIR.fullmatch(version_dir):
                ref = AdapterRef(adapter_id, int(version_dir[1:]))
                found[ref] = root.child(adapter_id, version_dir)
        return sorted(found.items())
