"""AdapterRegistry: transitions, epoch, audit, lineage, keys, group isolation, durability."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from adapterswap.errors import IllegalTransition, InvalidArgument, NotFound, StoreError
from adapterswap.store.records import DeletionState, JobState
from adapterswap.store.registry import AdapterRegistry
from adapterswap.store.schema import SCHEMA_VERSION
from adapterswap.types import ActiveChanges, AdapterRef, AdapterStatus, AdapterVersion

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
HR = "hr.b0001.000"
TRAINING, ACTIVE, REVOKED, FAILED, PURGED = (
    AdapterStatus.TRAINING,
    AdapterStatus.ACTIVE,
    AdapterStatus.REVOKED,
    AdapterStatus.FAILED,
    AdapterStatus.PURGED,
)
# method name -> the status it moves a version to
TARGET = {"activate": ACTIVE, "fail": FAILED, "revoke": REVOKED, "purge": PURGED}
LEGAL = {
    (TRAINING, "activate"),
    (TRAINING, "fail"),
    (ACTIVE, "revoke"),
    (REVOKED, "purge"),
    (FAILED, "purge"),
}
ILLEGAL = sorted(
    {(s, m) for s in AdapterStatus for m in TARGET} - LEGAL, key=lambda p: (p[0].value, p[1])
)
ALLOWED_TEXT = {
    ACTIVE: "training",
    FAILED: "training",
    REVOKED: "active",
    PURGED: "revoked or failed",
}


@pytest.fixture
def reg(tmp_path: Path) -> AdapterRegistry:
    registry = AdapterRegistry(tmp_path / "store.sqlite")
    yield registry
    registry.close()


def _version_in(reg: AdapterRegistry, status: AdapterStatus, adapter_id: str = HR) -> int:
    """Register a version of ``adapter_id`` and walk it to ``status`` by legal steps."""
    version = reg.register_version(adapter_id, adapter_id.split(".")[0], "mem://x", ["d1"]).version
    steps = {
        TRAINING: [],
        ACTIVE: ["activate"],
        REVOKED: ["activate", "revoke"],
        FAILED: ["fail"],
        PURGED: ["fail", "purge"],
    }[status]
    for step in steps:
        getattr(reg, step)(adapter_id, version)
    return version


def _actions(reg: AdapterRegistry) -> list[str]:
    return [entry.action for entry in reg.audit_log()]


# -- registration ---------------------------------------------------------------------------


def test_register_numbers_versions_per_adapter_and_starts_training(reg: AdapterRegistry) -> None:
    first = reg.register_version(HR, "hr", "mem://1", ["d2", "d1", "d1"], manifest={"lr": 0.001})
    second = reg.register_version(HR, "hr", "mem://2", ["d3"])
    other = reg.register_version("eng.b0001.000", "eng", "mem://3", ["e1"])
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert first.status is TRAINING and first.status == "training"
    assert (first.shard, first.group, first.uri, first.doc_count) == (HR, "hr", "mem://1", 2)
    assert first.ref == AdapterRef(HR, 1)
    assert reg.lineage(HR, 1) == ["d1", "d2"]
    assert reg.manifest(HR, 1) == {"lr": 0.001} and reg.manifest(HR, 2) is None
    assert reg.get_version(HR, 1) == first


def test_an_adapter_never_changes_group(reg: AdapterRegistry) -> None:
    reg.register_version(HR, "hr", "mem://1", ["d1"])
    with pytest.raises(InvalidArgument, match="adapter 'hr.b0001.000' belongs to group 'hr'"):
        reg.register_version(HR, "eng", "mem://2", ["d2"])
    assert _actions(reg) == ["register"]


def test_register_rejects_a_bad_group(reg: AdapterRegistry) -> None:
    with pytest.raises(InvalidArgument, match="group: got 'HR'"):
        reg.register_version(HR, "HR", "mem://1", ["d1"])


# -- transitions ----------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "method"), sorted(LEGAL, key=lambda p: (p[0].value, p[1])))
def test_legal_transition(reg: AdapterRegistry, start: AdapterStatus, method: str) -> None:
    version = _version_in(reg, start)
    before = len(reg.audit_log())
    moved = getattr(reg, method)(HR, version, actor="tester")
    assert moved.status is TARGET[method]
    assert reg.get_version(HR, version).status is TARGET[method]
    assert moved.updated_at >= moved.created_at
    new_rows = reg.audit_log(since_seq=before)
    assert [(e.actor, e.action, e.details["version"]) for e in new_rows] == [
        ("tester", method, version)
    ]


@pytest.mark.parametrize(("start", "method"), ILLEGAL)
def test_illegal_transition(reg: AdapterRegistry, start: AdapterStatus, method: str) -> None:
    version = _version_in(reg, start)
    audit_before, epoch_before = reg.audit_log(), reg.epoch()
    target = TARGET[method]
    expected = (
        f"cannot make adapter '{HR}' version {version} {target}: it is {start}, "
        f"and only a {ALLOWED_TEXT[target]} version can become {target}"
    )
    with pytest.raises(IllegalTransition, match=re.escape(expected)):
        getattr(reg, method)(HR, version)
    assert reg.get_version(HR, version).status is start
    assert reg.audit_log() == audit_before and reg.epoch() == epoch_before


@pytest.mark.parametrize(
    ("start", "method", "hint"),
    [
        (TRAINING, "revoke", "; stop a training version with fail"),
        (ACTIVE, "purge", "; revoke it first"),
        (REVOKED, "activate", "; register a new version instead"),
        (PURGED, "activate", "; register a new version instead"),
    ],
)
def test_illegal_transition_names_the_fix(
    reg: AdapterRegistry, start: AdapterStatus, method: str, hint: str
) -> None:
    version = _version_in(reg, start)
    with pytest.raises(IllegalTransition, match=re.escape(hint) + "$"):
        getattr(reg, method)(HR, version)


@pytest.mark.parametrize("method", sorted(TARGET))
def test_unknown_versions_are_not_found(reg: AdapterRegistry, method: str) -> None:
    reg.register_version(HR, "hr", "mem://1", ["d1"])
    with pytest.raises(NotFound, match="adapter 'hr.b0001.000' version 2 does not exist"):
        getattr(reg, method)(HR, 2)
    with pytest.raises(NotFound, match="adapter 'nope' version 1 does not exist"):
        getattr(reg, method)("nope", 1)


def test_unknown_versions_are_not_found_by_queries(reg: AdapterRegistry) -> None:
    for query in (reg.get_version, reg.lineage, reg.manifest):
        with pytest.raises(NotFound, match="adapter 'nope' version 1 does not exist"):
            query("nope", 1)


def test_activating_supersedes_the_active_version(reg: AdapterRegistry) -> None:
    _version_in(reg, ACTIVE)
    reg.register_version(HR, "hr", "mem://2", ["d1", "d2"])
    epoch, seq = reg.epoch(), reg.audit_log()[-1].seq
    new = reg.activate(HR, 2, actor="trainer")
    assert new.status is ACTIVE and reg.get_version(HR, 1).status is REVOKED
    assert reg.epoch() == epoch + 1
    assert [v.ref for v in reg.active_adapters(["hr"])] == [AdapterRef(HR, 2)]
    rows = [(e.action, e.details) for e in reg.audit_log(since_seq=seq)]
    assert rows == [
        (
            "revoke",
            {"id": HR, "version": 1, "epoch": 2, "reason": "superseded", "superseded_by": 2},
        ),
        ("activate", {"id": HR, "version": 2, "epoch": 2}),
    ]


def test_a_refused_activation_leaves_the_active_version_alone(reg: AdapterRegistry) -> None:
    _version_in(reg, ACTIVE)
    failed = _version_in(reg, FAILED)
    epoch = reg.epoch()
    with pytest.raises(IllegalTransition, match="it is failed"):
        reg.activate(HR, failed)
    assert reg.get_version(HR, 1).status is ACTIVE and reg.epoch() == epoch


# -- epoch ----------------------------------------------------------------------------------


def test_the_epoch_moves_exactly_when_the_active_set_changes(reg: AdapterRegistry) -> None:
    steps = [
        (lambda: reg.register_version(HR, "hr", "mem://1", ["d1"]), 0),
        (lambda: reg.activate(HR, 1), 1),
        (lambda: reg.register_version(HR, "hr", "mem://2", ["d1"]), 0),
        (lambda: reg.activate(HR, 2), 1),  # supersedes v1: one change, one bump
        (lambda: reg.purge(HR, 1), 0),
        (lambda: reg.register_version(HR, "hr", "mem://3", ["d1"]), 0),
        (lambda: reg.fail(HR, 3), 0),
        (lambda: reg.purge(HR, 3), 0),
        (lambda: reg.create_key("alice", ["hr"]), 0),
        (lambda: reg.append_audit("ingest", "ingest", docs=["d1"]), 0),
        (lambda: reg.revoke(HR, 2), 1),
    ]
    assert reg.epoch() == 0
    for step, bump in steps:
        before = reg.epoch()
        step()
        assert reg.epoch() == before + bump
    assert reg.epoch() == 3


# -- audit ----------------------------------------------------------------------------------


def test_every_mutation_writes_its_audit_row(reg: AdapterRegistry) -> None:
    reg.register_version(HR, "hr", "mem://1", ["d1"], actor="trainer")
    reg.activate(HR, 1, actor="trainer")
    reg.revoke(HR, 1, reason="doc d1 deleted", actor="admin")
    reg.purge(HR, 1, actor="sweeper")
    reg.register_version(HR, "hr", "mem://2", ["d2"], actor="trainer")
    reg.fail(HR, 2, reason="worker died", actor="trainer")
    _, record = reg.create_key("alice", ["hr"], actor="cli")
    reg.revoke_key(record.key_id, actor="cli")
    seq = reg.append_audit("ingest", "ingest", docs=["d1", "d2"], batch="b0001")
    entries = reg.audit_log()
    assert [(e.actor, e.action) for e in entries] == [
        ("trainer", "register"),
        ("trainer", "activate"),
        ("admin", "revoke"),
        ("sweeper", "purge"),
        ("trainer", "register"),
        ("trainer", "fail"),
        ("cli", "create_key"),
        ("cli", "revoke_key"),
        ("ingest", "ingest"),
    ]
    assert [e.seq for e in entries] == list(range(1, 10)) and seq == 9
    assert entries[2].details == {"id": HR, "version": 1, "epoch": 2, "reason": "doc d1 deleted"}
    assert entries[-1].details == {"docs": ["d1", "d2"], "batch": "b0001"}
    assert [e.seq for e in reg.audit_log(since_seq=3, limit=2)] == [4, 5]


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit", "DELETE FROM audit WHERE seq = 1"],
)
def test_the_audit_log_is_append_only(reg: AdapterRegistry, statement: str) -> None:
    reg.append_audit("ingest", "ingest", docs=["d1"])
    with (
        sqlite3.connect(reg.db_path) as conn,
        pytest.raises(sqlite3.DatabaseError, match="audit log is append-only"),
    ):
        conn.execute(statement)
    assert [(e.actor, e.action) for e in reg.audit_log()] == [("ingest", "ingest")]


# -- queries --------------------------------------------------------------------------------


def test_active_adapters_only_returns_the_callers_groups(reg: AdapterRegistry) -> None:
    for adapter_id in ("hr.b0001.001", "hr.b0001.000", "eng.b0001.000", "legal.b0001.000"):
        _version_in(reg, ACTIVE, adapter_id)
    _version_in(reg, TRAINING, "hr.b0002.000")
    _version_in(reg, REVOKED, "hr.b0003.000")
    assert [v.adapter_id for v in reg.active_adapters(["hr"])] == ["hr.b0001.000", "hr.b0001.001"]
    assert [v.group for v in reg.active_adapters({"eng", "legal"})] == ["eng", "legal"]
    assert reg.active_adapters([]) == []
    assert reg.active_adapters(["finance"]) == []
    assert reg.active_adapters(["hr' OR '1'='1"]) == []


def test_versions_containing_follows_lineage_in_every_status(reg: AdapterRegistry) -> None:
    reg.register_version(HR, "hr", "mem://1", ["d1", "d2"])
    reg.activate(HR, 1)
    reg.register_version(HR, "hr", "mem://2", ["d2", "d3"])
    reg.register_version("eng.b0001.000", "eng", "mem://3", ["d9"])
    assert [v.ref for v in reg.versions_containing("d2")] == [AdapterRef(HR, 1), AdapterRef(HR, 2)]
    assert [(v.ref, v.status) for v in reg.versions_containing("d1")] == [
        (AdapterRef(HR, 1), ACTIVE)
    ]
    assert reg.versions_containing("nope") == []


def test_list_versions_filters_by_adapter_and_status(reg: AdapterRegistry) -> None:
    _version_in(reg, REVOKED)
    _version_in(reg, ACTIVE)
    _version_in(reg, ACTIVE, "eng.b0001.000")
    assert [v.ref for v in reg.list_versions()] == [
        AdapterRef("eng.b0001.000", 1),
        AdapterRef(HR, 1),
        AdapterRef(HR, 2),
    ]
    assert [v.ref for v in reg.list_versions(HR)] == [AdapterRef(HR, 1), AdapterRef(HR, 2)]
    assert [v.ref for v in reg.list_versions(statuses=["active"])] == [
        AdapterRef("eng.b0001.000", 1),
        AdapterRef(HR, 2),
    ]
    assert [v.ref for v in reg.list_versions(HR, statuses=[REVOKED])] == [AdapterRef(HR, 1)]
    assert reg.list_versions(statuses=[]) == []
    with pytest.raises(InvalidArgument, match="statuses: got 'live'; use some of training, active"):
        reg.list_versions(statuses=["live"])


def test_summary_counts(reg: AdapterRegistry) -> None:
    _version_in(reg, ACTIVE)
    _version_in(reg, TRAINING)
    _version_in(reg, PURGED, "eng.b0001.000")
    _, record = reg.create_key("alice", ["hr"])
    reg.create_key("bob", ["eng"])
    reg.revoke_key(record.key_id)
    summary = reg.summary()
    assert summary.epoch == 1 and summary.adapters == 2
    assert summary.versions_by_status == {
        "training": 1,
        "active": 1,
        "revoked": 0,
        "failed": 0,
        "purged": 1,
    }
    assert (summary.active_keys, summary.revoked_keys) == (1, 1)
    assert summary.last_audit_seq == reg.audit_log()[-1].seq


# -- API keys -------------------------------------------------------------------------------


def test_a_key_looks_up_its_principal(reg: AdapterRegistry) -> None:
    key, record = reg.create_key(" alice ", ["hr", "eng", "hr"], admin=True)
    principal = reg.lookup_key(key)
    assert principal is not None
    assert (principal.key_id, principal.user, principal.groups, principal.admin) == (
        record.key_id,
        "alice",
        ("eng", "hr"),
        True,
    )
    assert key.startswith(f"as_{record.key_id}_")


def test_wrong_unknown_revoked_and_malformed_keys_give_none(reg: AdapterRegistry) -> None:
    key, record = reg.create_key("alice", ["hr"])
    other, _ = reg.create_key("bob", ["hr"])
    key_id, secret = key.split("_")[1], key.split("_")[2]
    wrong_secret = f"as_{key_id}_{other.split('_')[2]}"
    unknown_id = f"as_{'0' * 16}_{secret}"
    for bad in (wrong_secret, unknown_id, key[:-1], key + "0", "", "as_x_y", key.upper()):
        assert reg.lookup_key(bad) is None, bad
    assert reg.lookup_key(key) is not None
    reg.revoke_key(record.key_id)
    assert reg.lookup_key(key) is None
    assert reg.lookup_key(other) is not None


def test_keys_are_stored_only_as_salted_hashes(reg: AdapterRegistry, tmp_path: Path) -> None:
    made = [reg.create_key(user, ["hr"]) for user in ("alice", "bob")]
    with sqlite3.connect(reg.db_path) as conn:
        salts = [row[0] for row in conn.execute("SELECT salt FROM api_keys")]
    assert len(salts) == 2 and salts[0] != salts[1]

    def secrets_in_files() -> list[str]:
        files = sorted(tmp_path.glob("store.sqlite*"))
        assert any(f.name.endswith("-wal") for f in files)
        blob = b"".join(f.read_bytes() for f in files)
        found = []
        for key, _ in made:
            secret = key.split("_")[2]
            for needle in (key.encode(), secret.encode(), bytes.fromhex(secret)):
                if needle in blob:
                    found.append(secret)
        return found

    assert secrets_in_files() == []  # the commit still sits in the -wal file
    with sqlite3.connect(reg.db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert secrets_in_files() == []  # and now in the main file


def test_list_keys_never_shows_hashes_or_secrets(reg: AdapterRegistry) -> None:
    key, record = reg.create_key("alice", ["hr"])
    listed = reg.list_keys()
    assert listed == [record]
    assert not {"salt", "hash", "secret"} & set(vars(record))
    assert key.split("_")[2] not in repr(listed)


def test_revoke_key_is_idempotent_and_audited_once(reg: AdapterRegistry) -> None:
    _, record = reg.create_key("alice", ["hr"])
    first = reg.revoke_key(record.key_id)
    again = reg.revoke_key(record.key_id)
    assert first.revoked and again == first
    assert _actions(reg) == ["create_key", "revoke_key"]
    with pytest.raises(NotFound, match="key_id: no key 'nope'"):
        reg.revoke_key("nope")


@pytest.mark.parametrize(
    ("user", "groups", "message"),
    [
        ("", ["hr"], "user: got ''; give a non-empty user name"),
        ("alice", [], "groups: got none; a key needs at least one group"),
        ("alice", ["hr", "Bad Group"], "group: got 'Bad Group'; a group name must match"),
    ],
)
def test_create_key_validates_user_and_groups(
    reg: AdapterRegistry, user: str, groups: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        reg.create_key(user, groups)
    assert reg.list_keys() == [] and reg.audit_log() == []


# -- schema and durability ------------------------------------------------------------------


def test_reopening_keeps_everything_and_the_schema_is_idempotent(tmp_path: Path) -> None:
    first = AdapterRegistry(tmp_path / "store.sqlite")
    _version_in(first, ACTIVE)
    key, _ = first.create_key("alice", ["hr"])
    first.close()
    again = AdapterRegistry(tmp_path / "store.sqlite")
    assert again.get_version(HR, 1).status is ACTIVE and again.epoch() == 1
    assert again.lookup_key(key) is not None
    assert _actions(again) == ["register", "activate", "create_key"]
    with sqlite3.connect(again.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    AdapterRegistry(tmp_path / "store.sqlite").close()
    with sqlite3.connect(tmp_path / "store.sqlite") as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match=f"schema version 99, this code reads {SCHEMA_VERSION} "):
        AdapterRegistry(tmp_path / "store.sqlite")


def test_a_store_from_newer_code_is_refused_before_anything_changes(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    AdapterRegistry(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.execute("PRAGMA journal_mode = DELETE")
    before = db.read_bytes()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, this code reads"):
        AdapterRegistry(db)
    assert db.read_bytes() == before  # not even switched to WAL


def _schema(db: Path) -> set[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return set(
            conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        )


def test_a_store_written_by_schema_1_code_upgrades_in_place(tmp_path: Path) -> None:
    """tests/data/store_v1.sqlite was written by the code of 25591f0 (schema 1):

    python tests/data/make_store_v1.py 25591f0 tests/data/store_v1.sqlite
    """
    db = tmp_path / "store.sqlite"
    shutil.copyfile(DATA / "store_v1.sqlite", db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            1,
        )
        audit_rows = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    reg = AdapterRegistry(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            SCHEMA_VERSION,
        )
        assert [r[1:3] for r in conn.execute("PRAGMA table_info(leases)")] == [
            ("name", "TEXT"),
            ("owner", "TEXT"),
            ("expires_at", "REAL"),
        ]
    # everything written by the old code is there, and reads the same
    assert [(v.adapter_id, v.version, v.status) for v in reg.list_versions()] == [
        ("hr.b0001.000", 1, REVOKED),
        ("hr.b0001.001", 1, TRAINING),
        ("hr.b0001.002", 1, PURGED),
        ("ops.b0001.000", 1, REVOKED),
    ]
    assert reg.lineage_hashes("hr.b0001.000", 1) == {"hr-1": None, "hr-2": None}
    assert [k.user for k in reg.list_keys()] == ["alice"]
    assert [(d.doc_id, d.state, d.content_hash, d.shards) for d in reg.deletions()] == [
        ("hr-1", "deleting", "sha256:hr-1", None),
        ("o1", "removed", "sha256:o1", None),
        ("gone", "purged", "sha256:gone", None),
    ]
    assert reg.deletion("hr-1").revoked == [AdapterRef("hr.b0001.000", 1)]
    assert reg.live_replicas(10**9)[0][:2] == ("replica-a", 2)
    log = reg.audit_log()
    assert len(log) == audit_rows + 2 and [(e.action, e.details) for e in log[-2:]] == [
        ("migrate", {"from": 1, "to": 2}),
        ("migrate", {"from": 2, "to": 3}),
    ]
    # the version epochs back-fill with the epoch at migration: deltas start there
    with sqlite3.connect(db) as conn:
        floor = conn.execute("SELECT value FROM meta WHERE key = 'delta_floor'").fetchone()[0]
        stamps = conn.execute(
            "SELECT adapter_id, activated_epoch, deactivated_epoch FROM versions "
            "ORDER BY adapter_id"
        ).fetchall()
    assert reg.active_changes(floor - 1) is None  # from before the migration: unknowable
    # from the floor on, a delta; the back-filled stamps make it a superset (harmless)
    assert reg.active_changes(floor) == ActiveChanges(
        floor, floor, (), (AdapterRef("hr.b0001.000", 1), AdapterRef("ops.b0001.000", 1))
    )
    assert floor == reg.epoch() > 0 and stamps == [
        ("hr.b0001.000", None, floor),
        ("hr.b0001.001", None, None),
        ("hr.b0001.002", None, None),
        ("ops.b0001.000", None, floor),
    ]
    # and behaves by the new rules: the unfinished deletions still block, history is kept
    stale = reg.register_version("hr.b0001.000", "hr", "x", ["hr-1"]).version
    with pytest.raises(IllegalTransition, match="'hr-1', whose deletion is unfinished"):
        reg.activate("hr.b0001.000", stale)
    reg.advance_deletion(reg.deletions("hr-1"), DeletionState.PURGED)
    job, _ = reg.begin_delete(["hr-1"], "test", content_hashes={"hr-1": "sha256:hr-1"})
    assert job is not None and [d.state for d in reg.deletions("hr-1")] == ["purged", "deleting"]
    reg.close()
    again = AdapterRegistry(db)  # opening again migrates nothing
    assert [e.action for e in again.audit_log()].count("migrate") == 2
    again.close()
    fresh = tmp_path / "fresh.sqlite"
    AdapterRegistry(fresh).close()
    assert _schema(db) == _schema(fresh)  # the upgraded store is exactly a new one


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_another_process_sees_every_mutation_and_we_see_its_own(reg: AdapterRegistry) -> None:
    key, _ = reg.create_key("alice", ["hr"])
    _version_in(reg, ACTIVE)
    reg.register_version(HR, "hr", "mem://2", ["d1", "d2"])
    code = f"""
import json
from adapterswap.store.registry import AdapterRegistry
reg = AdapterRegistry({str(reg.db_path)!r})
seen = {{
    "principal": reg.lookup_key({key!r}).user,
    "versions": [(v.version, v.status.value) for v in reg.list_versions()],
    "epoch": reg.epoch(),
    "audit": [e.action for e in reg.audit_log()],
}}
reg.activate({HR!r}, 2, actor="other-process")
print(json.dumps(seen))
"""
    done = _run_python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "principal": "alice",
        "versions": [[1, "active"], [2, "training"]],
        "epoch": 1,
        "audit": ["create_key", "register", "activate", "register"],
    }
    # The same object, opened before the other process wrote, sees its write: no stale cache.
    assert [v.status for v in reg.list_versions()] == [REVOKED, ACTIVE]
    assert reg.epoch() == 2 and reg.audit_log()[-1].actor == "other-process"


def test_an_acknowledged_mutation_survives_a_kill(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    code = f"""
import os, signal
from adapterswap.store.registry import AdapterRegistry
reg = AdapterRegistry({str(db)!r})
reg.register_version({HR!r}, "hr", "mem://1", ["d1"])
reg.activate({HR!r}, 1)
key, _ = reg.create_key("alice", ["hr"])
print(key, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
"""
    done = _run_python(code)
    assert done.returncode == -9
    reg = AdapterRegistry(db)
    assert reg.lookup_key(done.stdout.strip()) is not None
    assert isinstance(reg.get_version(HR, 1), AdapterVersion)
    assert reg.get_version(HR, 1).status is ACTIVE and reg.epoch() == 1
    reg.close()


def test_active_snapshot_pairs_the_epoch_with_its_active_set(reg: AdapterRegistry) -> None:
    assert reg.active_snapshot() == (0, [])
    v1 = _version_in(reg, AdapterStatus.ACTIVE)
    _version_in(reg, AdapterStatus.TRAINING, "eng.b0001.000")
    epoch, active = reg.active_snapshot()
    assert epoch == reg.epoch() == 1
    assert [(v.adapter_id, v.version) for v in active] == [(HR, v1)]
    reg.revoke(HR, v1)
    assert reg.active_snapshot() == (2, [])


def test_jobs_move_pending_running_finished_and_audit_the_end(reg):
    job = reg.create_job("train", "process:h:1", actor="root")
    assert (job.state, job.progress, job.result, job.finished) == (
        JobState.PENDING,
        {},
        None,
        False,
    )
    reg.update_job(job.job_id, JobState.RUNNING)
    reg.update_job(job.job_id, JobState.RUNNING, progress={"hr.b0001.000": {"step": 3}})
    done = reg.update_job(job.job_id, JobState.SUCCEEDED, result={"trained": ["hr.b0001.000"]})
    assert done.finished and done.progress == {"hr.b0001.000": {"step": 3}}
    assert done.result == {"trained": ["hr.b0001.000"]}
    for state in (JobState.RUNNING, JobState.FAILED, JobState.SUCCEEDED):
        with pytest.raises(IllegalTransition, match="cannot become"):
            reg.update_job(job.job_id, state)  # a finished job stays as it ended
    with pytest.raises(IllegalTransition):
        reg.update_job(reg.create_job("train", "x").job_id, JobState.SUCCEEDED)  # never ran
    with pytest.raises(NotFound, match="job_id: no job 'train-nope'"):
        reg.get_job("train-nope")
    assert [j.job_id for j in reg.list_jobs(states=["succeeded"])] == [job.job_id]
    actions = [(e.action, e.details.get("job_id")) for e in reg.audit_log()]
    assert ("submit_job", job.job_id) in actions and ("finish_job", job.job_id) in actions
