"""Write a store as AdapterSwap's schema-1 code wrote it, for the migration test.

    python tests/data/make_store_v1.py 25591f0 tests/data/store_v1.sqlite

loads ``adapterswap/registry.py`` as it was at the given commit (schema version 1, the last one
before ``PRAGMA user_version`` migrations) and records a little of everything: versions
in every status with lineage, a key, jobs, deletions in three states and a replica. That
module imports its neighbours from where they were then (``adapterswap.keys``), so run this
with a checkout of that commit first on the path::

    git worktree add /tmp/as-v1 25591f0
    PYTHONPATH=/tmp/as-v1 python tests/data/make_store_v1.py 25591f0 tests/data/store_v1.sqlite
"""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path


def old_registry(commit: str):
    source = subprocess.run(
        ["git", "show", f"{commit}:adapterswap/registry.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "registry_v1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("registry_v1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["registry_v1"] = module
    spec.loader.exec_module(module)
    return module


def main(commit: str, target: Path) -> None:
    module = old_registry(commit)
    assert module.SCHEMA_VERSION == 1, module.SCHEMA_VERSION
    target.unlink(missing_ok=True)
    reg = module.AdapterRegistry(target)
    for adapter_id, docs in [("hr.b0001.000", ["hr-1", "hr-2"]), ("ops.b0001.000", ["o1"])]:
        group = adapter_id.split(".")[0]
        version = reg.register_version(adapter_id, group, "mem://1", docs, manifest={"n": 1})
        reg.activate(adapter_id, version.version)
    reg.register_version("hr.b0001.001", "hr", "mem://2", ["hr-3"])  # left training
    failed = reg.register_version("hr.b0001.002", "hr", "mem://3", ["hr-4"]).version
    reg.fail("hr.b0001.002", failed, reason="died")
    reg.purge("hr.b0001.002", failed)
    reg.create_key("alice", ["hr"], admin=True)
    reg.ack_epoch("replica-a", reg.epoch())
    hashes = {d: f"sha256:{d}" for d in ("hr-1", "o1", "gone")}
    reg.begin_delete(["hr-1"], "test", actor="test", content_hashes=hashes)  # deleting
    reg.begin_delete(["o1"], "test", actor="test", content_hashes=hashes)
    reg.advance_deletion(["o1"], module.DeletionState.REMOVED)  # removed
    reg.begin_delete(["gone"], "test", actor="test", content_hashes=hashes)
    reg.advance_deletion(["gone"], module.DeletionState.PURGED)  # purged
    reg.close()
    with sqlite3.connect(target) as conn:  # one self-contained file, no -wal beside it
        conn.execute("PRAGMA journal_mode = DELETE")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
